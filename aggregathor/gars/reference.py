"""Reference implementations of the aggregation rules, written straight from the papers.

These are the specification that the fast TensorFlow rules of :mod:`aggregathor.gars` are tested against
(``tests/test_gars_reference.py``). They are deliberately simple and independent of the fast path: numpy,
float64 throughout, explicit loops over rows and coordinates, no Gram-matrix shortcut, no sorting networks.
Clarity over speed: do not use them on real gradients.

Every rule has the signature ``rule(x, f, **params) -> (d,)`` with ``x`` an ``(n, d)`` array; every
pre-aggregation wrapper has ``wrapper(x, f, **params) -> (n', d)``. :data:`REFERENCES` maps the registry
names to the rules, :data:`WRAPPERS` the wrapper names to the wrappers, and :func:`compose` chains them.

Conventions (the fast path must match them):

- Ties are broken towards the lowest row index (Krum, Multi-Krum, Bulyan's iterated Krum, NNM); for the
  "values closest to the median" of MeaMed and Bulyan, towards the smaller value. The papers leave ties
  open, so the tests accept any tie-break; these are only the references' own deterministic choices.
- Non-finite inputs. The papers assume real vectors; a NaN or an infinity is what a lossy transport
  or a Byzantine worker can send instead. Rules documented ``nan_robust`` treat a non-finite entry as
  carrying no information:

  * coordinate-wise rules (average-nan, median, meamed) use only the finite values of each coordinate;
    trimmed-mean orders the values as ``-inf < finite < +inf <= NaN`` (a NaN sorts last, as in
    ``np.sort``) and trims as usual, so at most ``f`` non-finite values per coordinate are all trimmed;
  * distance-based rules (Krum, Multi-Krum, Bulyan, NNM) take the distance between two rows to be
    ``+inf`` when either holds a non-finite entry, so a non-finite row has score ``+inf`` and is never a
    nearest neighbour of a finite row;
  * the geometric median and centered clipping give a non-finite row weight 0;
  * the wrappers NNM, clipping and ARC turn a non-finite row into a row of NaN; bucketing just averages
    (a bucket with a non-finite member is non-finite where that member is).

  Which fast rules promise this is the class attribute ``nan_robust``; the tests only feed non-finite
  rows to those rules, at most ``f`` of them.
- Choices the papers leave to the implementation, fixed here as the fast rules document them: Multi-Krum's
  default ``m = n - f - 2`` (AggregaThor); the smoothed Weiszfeld's start (the mean of the n - f finite rows
  closest to the medoid) and
  defaults (8 iterations, ``nu = 1e-6``); centered clipping's start (the coordinate-wise median; the
  paper's is the previous aggregate, pass it as ``center``); bucketing's last bucket (the mean of its
  actual members); Bulyan's ``variant="multi-krum"``, the original AggregaThor kernel
  (:func:`bulyan_aggregathor`), which is *not* the paper's algorithm.
- Bounds checked by the references: only those needed for the definition to make sense (e.g. Krum
  ``n >= 2f + 3``, Bulyan ``n >= 4f + 3``, trimmed mean ``n > 2b``); Multi-Krum accepts any
  ``1 <= m <= n`` as in Blanchard et al.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "REFERENCES",
    "WRAPPERS",
    "arc",
    "average",
    "average_nan",
    "bucketing",
    "bulyan",
    "bulyan_aggregathor",
    "bulyan_selection",
    "centered_clipping",
    "clipping",
    "compose",
    "draco",
    "draco_decode",
    "draco_majority",
    "geometric_median",
    "krum",
    "krum_scores",
    "meamed",
    "median",
    "multi_krum",
    "nnm",
    "pairwise_sq_distances",
    "trimmed_mean",
]


# ---------------------------------------------------------------------------------------------- helpers
def _matrix(x: Any) -> np.ndarray:
    """``x`` as a float64 ``(n, d)`` array (a copy)."""
    a = np.array(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"expected an (n, d) matrix with n >= 1, got shape {a.shape}")
    return a


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose entries are all finite."""
    return np.array([bool(np.all(np.isfinite(row))) for row in x])


def _median_of(values: Sequence[float]) -> float:
    """The median of a 1-D list of finite values: the middle one, or the mean of the two middle ones."""
    v = sorted(float(t) for t in values)
    k = len(v)
    if k == 0:
        return float("nan")
    if k % 2 == 1:
        return v[k // 2]
    return (v[k // 2 - 1] + v[k // 2]) / 2.0


def _closest_to(values: Sequence[float], center: float, count: int) -> list[float]:
    """The ``count`` values closest to ``center``; a non-finite value is at distance ``+inf``.

    Ties in distance are broken towards the smaller value (so the result is, among the windows of
    ``count`` consecutive sorted values with the smallest sum of distances to ``center``, the leftmost).
    """

    def key(v: float) -> tuple[float, float]:
        dist = abs(v - center) if np.isfinite(v) else float("inf")
        return (dist, v if not np.isnan(v) else float("inf"))

    return sorted((float(v) for v in values), key=key)[:count]


def pairwise_sq_distances(x: Any) -> np.ndarray:
    """``D[i, j] = ||x_i - x_j||^2`` computed directly from the differences, in float64.

    ``+inf`` when row ``i`` or row ``j`` is non-finite (and ``D[i, i] = 0`` for a finite row).
    """
    a = _matrix(x)
    n = a.shape[0]
    ok = _finite_rows(a)
    dist = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            if ok[i] and ok[j]:
                diff = a[i] - a[j]
                dist[i, j] = float(np.dot(diff, diff))
    return dist


# ------------------------------------------------------------------------------------- plain averages
def average(x: Any, f: int = 0) -> np.ndarray:
    r"""Coordinate-wise mean :math:`\frac1n\sum_i x_i` (not resilient: Blanchard et al., NeurIPS 2017, Lemma 1).

    A single non-finite entry makes that coordinate non-finite.
    """
    a = _matrix(x)
    return a.sum(axis=0) / a.shape[0]


def average_nan(x: Any, f: int = 0) -> np.ndarray:
    """Coordinate-wise mean of the finite values only (NaN and +-inf are ignored).

    A coordinate with no finite value at all is NaN. Not Byzantine-resilient: it only survives erasures
    (the NaN fill of lost datagrams), which is the original AggregaThor's ``average-nan``.
    """
    a = _matrix(x)
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        vals = [v for v in a[:, j] if np.isfinite(v)]
        out[j] = sum(vals) / len(vals) if vals else np.nan
    return out


# -------------------------------------------------------------------------------- coordinate-wise rules
def median(x: Any, f: int = 0) -> np.ndarray:
    """Coordinate-wise median (Yin et al., ICML 2018, Definition 1; the "marginal median" of Xie et al. 2018).

    Per coordinate, the median of the finite values: the middle one for an odd count, the mean of the two
    middle ones for an even count; NaN when no value is finite.
    """
    a = _matrix(x)
    return np.array([_median_of([v for v in a[:, j] if np.isfinite(v)]) for j in range(a.shape[1])])


def meamed(x: Any, f: int) -> np.ndarray:
    r"""Mean around the median (Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116).

    Per coordinate :math:`j`, with :math:`m_j` the median of the finite values (as :func:`median`), the mean of
    the :math:`n - f` values :math:`x_{ij}` with the smallest :math:`|x_{ij} - m_j|` (non-finite values are at
    distance :math:`+\infty`). Ties in distance: the smaller value first. Equivalently, among the windows of
    :math:`n - f` consecutive sorted values minimising the *sum* of distances to the median, the leftmost.

    (A window minimising the *maximum* distance is not equivalent when values repeat at the tie distance:
    for ``[-1, -1, -1, 0, 0.5, 2, 3]``, ``f = 3`` the leftmost min-max window is ``[-1, -1, -1, 0]``, mean
    -0.75, which is not a set of the 4 values nearest to the median 0; the paper's answer is -0.375.)
    """
    a = _matrix(x)
    n, d = a.shape
    if not 0 <= f < n:
        raise ValueError(f"meamed needs 0 <= f < n, got n={n}, f={f}")
    out = np.empty(d)
    for j in range(d):
        col = a[:, j]
        med = _median_of([v for v in col if np.isfinite(v)])
        chosen = _closest_to(col, med, n - f)
        out[j] = sum(chosen) / len(chosen)
    return out


def trimmed_mean(x: Any, f: int, b: int | None = None) -> np.ndarray:
    r"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, ICML 2018, Definition 2).

    Per coordinate, sort the :math:`n` values, drop the :math:`b` largest and the :math:`b` smallest (``b``
    defaults to ``f``; the paper's :math:`\beta = b/n \ge \alpha = f/n`), and average the :math:`n - 2b`
    others. Order: ``-inf < finite < +inf``, a NaN sorts as ``+inf`` (last, as in ``np.sort``), so up to
    ``f <= b`` non-finite values per coordinate are all trimmed away.
    """
    a = _matrix(x)
    n, d = a.shape
    b = f if b is None else int(b)
    if not 0 <= 2 * b < n:
        raise ValueError(f"trimmed-mean needs n > 2b, got n={n}, b={b}")
    out = np.empty(d)
    for j in range(d):
        kept = np.sort(a[:, j])[b : n - b]
        out[j] = kept.sum() / (n - 2 * b)
    return out


# ----------------------------------------------------------------------------------------- Krum family
def krum_scores(x: Any, f: int, *, neighbours: int | None = None) -> np.ndarray:
    r"""Krum's scores (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, §4, "Krum" definition).

    :math:`s(i) = \sum_{i \to j} \|x_i - x_j\|^2`, the sum of the **squared** distances from :math:`x_i` to its
    :math:`n - f - 2` closest other vectors (``neighbours`` overrides that count; a negative count is 0).
    A non-finite row has score :math:`+\infty`.
    """
    dist = pairwise_sq_distances(x)
    n = dist.shape[0]
    k = n - f - 2 if neighbours is None else neighbours
    k = max(0, min(k, n - 1))
    ok = _finite_rows(_matrix(x))
    scores = np.full(n, np.inf)
    for i in range(n):
        if not ok[i]:
            continue
        others = sorted(dist[i, j] for j in range(n) if j != i)
        scores[i] = float(sum(others[:k]))
    return scores


def _lowest_scores(scores: np.ndarray, m: int) -> list[int]:
    """Indices of the ``m`` smallest scores, ties towards the lowest index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:m]


def krum(x: Any, f: int) -> np.ndarray:
    r"""Krum (Blanchard et al., NeurIPS 2017, §4): the :math:`x_{i_*}` with the smallest score :func:`krum_scores`.

    Needs :math:`n \ge 2f + 3`. Ties: the lowest index.
    """
    a = _matrix(x)
    n = a.shape[0]
    if n < 2 * f + 3:
        raise ValueError(f"krum needs n >= 2f + 3, got n={n}, f={f}")
    return a[_lowest_scores(krum_scores(a, f), 1)[0]].copy()


def multi_krum(x: Any, f: int, m: int | None = None) -> np.ndarray:
    r"""Multi-Krum (Blanchard et al., NeurIPS 2017, "Multi-Krum" in the experiments; El Mhamdi et al. 2018).

    The **mean** (not the sum) of the :math:`m` vectors with the smallest Krum scores, the scores computed
    once over all :math:`n` vectors. Default :math:`m = n - f - 2`; needs :math:`n \ge 2f + 3` and
    :math:`1 \le m \le n`. Ties: the lowest indices.
    """
    a = _matrix(x)
    n = a.shape[0]
    if n < 2 * f + 3:
        raise ValueError(f"multi-krum needs n >= 2f + 3, got n={n}, f={f}")
    m = n - f - 2 if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"multi-krum needs 1 <= m <= n, got m={m}")
    chosen = _lowest_scores(krum_scores(a, f), m)
    return a[chosen].sum(axis=0) / m


def bulyan_selection(x: Any, f: int) -> list[int]:
    r"""The :math:`\theta = n - 2f` indices Bulyan selects by iterated Krum, in selection order.

    El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
    ICML 2018, §4: repeatedly apply Krum to the remaining set :math:`\mathcal R` (scores recomputed on
    :math:`\mathcal R` alone, with :math:`|\mathcal R| - f - 2` neighbours, at least 0), move the chosen
    vector from :math:`\mathcal R` to the selection set :math:`\mathcal S`, until
    :math:`|\mathcal S| = \theta`. Ties: the lowest original index.
    """
    a = _matrix(x)
    n = a.shape[0]
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(n - 2 * f):
        scores = krum_scores(a[remaining], f)
        best = _lowest_scores(scores, 1)[0]
        selected.append(remaining.pop(best))
    return selected


def bulyan(x: Any, f: int, variant: str = "krum") -> np.ndarray:
    r"""Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, §4, Algorithm "Bulyan"). Needs :math:`n \ge 4f + 3`.

    ``variant="krum"``, the paper: select :math:`\theta = n - 2f` vectors by :func:`bulyan_selection`, then per
    coordinate :math:`j` average the :math:`\beta = \theta - 2f` selected values closest to the
    coordinate-wise median of the selection (:math:`M[j] = \arg\min_{|M| = \beta} \sum_{X \in M} |X_j -
    \mathrm{median}_j|`); ties in distance: the smaller value first.

    ``variant="multi-krum"``: the original AggregaThor kernel, :func:`bulyan_aggregathor`.
    """
    a = _matrix(x)
    n, d = a.shape
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4f + 3, got n={n}, f={f}")
    if variant == "multi-krum":
        return bulyan_aggregathor(a, f)
    if variant != "krum":
        raise ValueError(f"bulyan: unknown variant {variant!r}")
    sel = a[bulyan_selection(a, f)]
    theta = n - 2 * f
    beta = theta - 2 * f
    out = np.empty(d)
    for j in range(d):
        col = sel[:, j]
        med = _median_of([v for v in col if np.isfinite(v)])
        chosen = _closest_to(col, med, beta)
        out[j] = sum(chosen) / beta
    return out


def bulyan_aggregathor(x: Any, f: int, trace: dict[str, Any] | None = None) -> np.ndarray:
    r"""Bulyan over Multi-Krum as the original AggregaThor computes it (Damaskinos et al., SysML 2019;
    ``native/op_bulyan/cpu.cpp`` of LPD-EPFL/AggregaThor), which is not the paper's algorithm:

    1. :math:`t = n - 2f - 2` rounds, :math:`b = t - 2f` values per coordinate, :math:`m = n - f - 2`.
    2. Krum scores once (:math:`m` nearest, squared distances); then every row keeps only its distances to
       its :math:`m` nearest rows, the others are set to 0 ("pruning").
    3. Round :math:`k = 0 .. t - 1`: rank the rows by score (rows removed earlier after every finite score,
       non-finite scores last); the round's vector is the **mean of the** :math:`m - k` best rows; then remove
       the best row and subtract from every other row's score its pruned distance to it.
    4. Per coordinate over the :math:`t` round vectors, the mean of the :math:`b` values closest to the
       **upper** median (sorted index :math:`\lfloor t/2 \rfloor`).

    Ties (left to ``std::sort``/``std::nth_element`` in the original): lowest index, smaller value.
    ``trace``, if a dict, receives ``"rounds"`` (the rows averaged in each round), ``"inter"`` (the round
    vectors) and ``"gaps"``: ``(gap, scale)`` for every decision taken (neighbour cut, ranking cut, best row,
    distance cut), so that a caller can tell a near tie.
    """
    a = _matrix(x)
    n, d = a.shape
    t, m = n - 2 * f - 2, n - f - 2
    b = t - 2 * f
    ok = _finite_rows(a)
    dist = pairwise_sq_distances(a)
    gaps: list[tuple[float, float]] | None = None if trace is None else trace.setdefault("gaps", [])
    scores = np.full(n, np.inf)
    kept = np.zeros((n, n))  # kept[i, j]: row i's distance to j if j is among i's m nearest, else 0
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j, i=i: (dist[i, j], j))
        if ok[i]:
            scores[i] = float(sum(dist[i, j] for j in order[:m]))
        for j in order[:m]:
            kept[i, j] = dist[i, j]
        if gaps is not None and ok[i] and m < len(order):
            gaps.append((dist[i, order[m]] - dist[i, order[m - 1]], dist[i, order[m]]))
    removed = np.zeros(n, dtype=bool)
    rounds = []
    for k in range(t):
        key = [
            (2 if not np.isfinite(scores[i]) else 1 if removed[i] else 0, scores[i] if not removed[i] else 0, i)
            for i in range(n)
        ]
        ranked = [i for _, _, i in sorted(key)]
        rounds.append(a[ranked[: m - k]].sum(axis=0) / (m - k))
        if trace is not None:
            trace.setdefault("rounds", []).append(ranked[: m - k])
        if gaps is not None:
            live = [scores[i] for i in ranked if not removed[i] and np.isfinite(scores[i])]
            if len(live) > m - k:
                gaps.append((live[m - k] - live[m - k - 1], live[m - k]))
            if len(live) > 1:
                gaps.append((live[1] - live[0], live[1]))
        best = ranked[0]
        removed[best] = True
        for i in range(n):
            if i != best and np.isfinite(scores[i]) and np.isfinite(kept[i, best]):
                scores[i] -= kept[i, best]
    inter = np.array(rounds)
    if trace is not None:
        trace["inter"] = inter
    out = np.empty(d)
    for j in range(d):
        col = np.sort(inter[:, j])
        upper_median = float(col[t // 2])
        chosen = _closest_to(col, upper_median, b)
        out[j] = sum(chosen) / b
        if gaps is not None and b < t:
            dd = sorted(abs(v - upper_median) for v in col)
            gaps.append((dd[b] - dd[b - 1], max(abs(v) for v in col)))
    return out


# ------------------------------------------------------------------------------ geometric median, CC
def geometric_median(
    x: Any, f: int = 0, *, iterations: int = 100, nu: float = 1e-6, start: Any | None = None
) -> np.ndarray:
    r"""Smoothed Weiszfeld (Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning",
    IEEE TSP 2022, Algorithm 2), equal weights :math:`\alpha_i = 1/n`.

    From :math:`z^{(0)}` (``start``; default the mean of the :math:`n - f` finite rows closest to the medoid,
    the finite row with the smallest sum of distances to the others, lowest index on ties: inside the honest
    cluster while :math:`f < n/2`, and not a data point, where Weiszfeld stalls), for :math:`t = 0 .. T-1`:
    :math:`\beta_i = \alpha_i / \max\{\nu, \|z^{(t)} - x_i\|\}`, :math:`z^{(t+1)} = \sum_i \beta_i x_i /
    \sum_i \beta_i`; return :math:`z^{(T)}` (``iterations`` = :math:`T`, default 8 as the fast rule; no early
    stop). A non-finite row gets weight 0 (its distance is :math:`+\infty`).
    """
    a = _matrix(x)
    ok = _finite_rows(a)
    rows = a[ok]
    if len(rows) == 0:
        return np.full(a.shape[1], np.nan)
    if start is None:
        dist = np.array([[float(np.linalg.norm(r - q)) for q in rows] for r in rows])
        medoid = int(np.argmin(dist.sum(axis=1)))
        near = np.argsort(dist[medoid], kind="stable")[: a.shape[0] - f]
        z = rows[near].mean(axis=0)
    else:
        z = np.array(start, dtype=np.float64).reshape(a.shape[1])
    for _ in range(int(iterations)):
        weights = np.array([1.0 / max(nu, float(np.linalg.norm(z - row))) for row in rows])
        z = (weights[:, None] * rows).sum(axis=0) / weights.sum()
    return z


def centered_clipping(
    x: Any, f: int = 0, *, tau: float = 10.0, iterations: int = 1, center: Any = "median"
) -> np.ndarray:
    r"""Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021, eq. (CC)).

    From :math:`v_0`, :math:`L` = ``iterations`` times:
    :math:`v_{l+1} = v_l + \frac1n \sum_i (x_i - v_l) \min\{1, \tau / \|x_i - v_l\|\}`. The paper starts from
    the previous aggregate (its momentum); here ``center`` is ``"median"`` (default, as the fast rule: the
    coordinate-wise median of the finite values, 0 where none is), ``"zero"``, or a ``(d,)`` array (pass the
    previous output for the paper's stateful version). A non-finite row contributes nothing (its clipping
    factor :math:`\tau/\infty = 0`), i.e. it counts as :math:`x_i = v_l`; a row at :math:`v_l` contributes 0.
    """
    a = _matrix(x)
    n, d = a.shape
    ok = _finite_rows(a)
    if isinstance(center, str) and center == "median":
        v = np.nan_to_num(median(a), nan=0.0)
    elif isinstance(center, str) and center == "zero":
        v = np.zeros(d)
    elif isinstance(center, str):
        raise ValueError(f"centered-clipping: unknown center {center!r}")
    else:
        v = np.array(center, dtype=np.float64).reshape(d)
    for _ in range(int(iterations)):
        step = np.zeros(d)
        for i in range(n):
            if not ok[i]:
                continue
            diff = a[i] - v
            norm = float(np.linalg.norm(diff))
            if norm > 0.0:
                step += diff * min(1.0, tau / norm)
        v = v + step / n
    return v


# --------------------------------------------------------------------------------------------- wrappers
def nnm(x: Any, f: int) -> np.ndarray:
    r"""Nearest-neighbour mixing (Allouah et al., "Fixing by Mixing", AISTATS 2023: NNM).

    Row :math:`i` becomes the mean of its :math:`n - f` nearest rows in Euclidean distance, itself included
    (distance 0). Ties: the lowest index. A non-finite row is at distance :math:`+\infty` from every row, so
    it is no finite row's neighbour while :math:`n - f` finite rows exist; its own output is a row of NaN.
    """
    a = _matrix(x)
    n = a.shape[0]
    dist = pairwise_sq_distances(a)
    ok = _finite_rows(a)
    out = np.full_like(a, np.nan)
    for i in range(n):
        if ok[i]:
            order = sorted(range(n), key=lambda j, i=i: (dist[i, j], j))
            out[i] = a[order[: n - f]].sum(axis=0) / (n - f)
    return out


def bucketing(
    x: Any, f: int = 0, *, s: int = 2, permutation: Sequence[int] | None = None, seed: int | None = None
) -> np.ndarray:
    r"""Bucketing (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022, Algorithm 1).

    Permute the rows by :math:`\pi` (``permutation``, or ``np.random.default_rng(seed).permutation(n)``), cut
    them into :math:`\lceil n/s \rceil` consecutive buckets of :math:`s` (the last one possibly smaller) and
    return the mean of each bucket (the mean over its actual members).
    """
    a = _matrix(x)
    n = a.shape[0]
    if s < 1:
        raise ValueError(f"bucketing needs s >= 1, got {s}")
    perm = list(np.random.default_rng(seed).permutation(n)) if permutation is None else list(permutation)
    if sorted(perm) != list(range(n)):
        raise ValueError(f"not a permutation of range({n}): {perm}")
    buckets = [perm[k : k + s] for k in range(0, n, s)]
    return np.array([a[b].sum(axis=0) / len(b) for b in buckets])


def clipping(x: Any, f: int = 0, *, c: float = 1.0) -> np.ndarray:
    r"""Static clipping: :math:`x_i \min\{1, c / \|x_i\|\}` (as used with NNM/ARC by Allouah et al. 2023/2025).

    A row with a non-finite norm becomes a row of NaN (it carries no usable information).
    """
    a = _matrix(x)
    return np.array([_clip(row, c) for row in a])


def _clip(row: np.ndarray, c: float) -> np.ndarray:
    norm = float(np.linalg.norm(row)) if np.all(np.isfinite(row)) else float("inf")
    if not np.isfinite(norm):
        return np.full_like(row, np.nan)
    if norm <= c:
        return row.copy()
    return row * (c / norm)


def arc(x: Any, f: int) -> np.ndarray:
    r"""Adaptive Robust Clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive Gradient
    Clipping for Robust Federated Learning", ICLR 2025, arXiv:2405.14432: "ARC").

    :math:`k = \lfloor 2 (f/n) (n - f) \rfloor`; sort the norms in decreasing order,
    :math:`\|x_{\pi(1)}\| \ge \dots \ge \|x_{\pi(n)}\|`; clip every row to :math:`C = \|x_{\pi(k+1)}\|`.
    A non-finite row has norm :math:`+\infty` (so it is among the :math:`k` largest) and becomes NaN.
    """
    a = _matrix(x)
    n = a.shape[0]
    k = (2 * f * (n - f)) // n
    norms = sorted((float(np.linalg.norm(r)) if np.all(np.isfinite(r)) else float("inf") for r in a), reverse=True)
    c = norms[min(k, n - 1)]
    return np.array([_clip(row, c) for row in a])


# ---------------------------------------------------------------------------------------------- Draco
def draco_majority(x: Any, f: int) -> list[int | None]:
    r"""Per group of :math:`r = 2f + 1` consecutive rows, the lowest index of a finite row whose exact value (its
    bytes) is held by at least :math:`f + 1` rows of the group, or None when there is none (Chen et al., ICML
    2018, repetition code: the majority vote decoder)."""
    a = np.asarray(x)
    n, r = a.shape[0], 2 * f + 1
    if n % r:
        raise ValueError(f"draco needs n to be a multiple of 2f + 1, got n={n}, f={f}")
    out: list[int | None] = []
    for g in range(n // r):
        rows = [a[g * r + i].tobytes() for i in range(r)]
        found = [g * r + i for i in range(r)
                 if rows.count(rows[i]) >= f + 1 and np.all(np.isfinite(a[g * r + i]))]
        out.append(found[0] if found else None)
    return out


def draco_decode(x: Any, f: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Each group's decoded gradient and where it decodes, two ``(n / r, d)`` arrays (groups of :math:`r = 2f + 1`
    consecutive rows).

    Per coordinate :math:`j` of group :math:`g`: the lowest-indexed finite value whose exact bits (in the input's
    own dtype) are held by at least :math:`f + 1` members, a majority; else the median of the group's finite
    values (:func:`median`). The group *decodes* :math:`j` when it has a majority there or all :math:`r` values
    are finite.
    """
    a = np.asarray(x)
    n, d = a.shape
    r = 2 * f + 1
    if n % r:
        raise ValueError(f"draco needs n to be a multiple of 2f + 1, got n={n}, f={f}")
    decoded, decodes = np.empty((n // r, d)), np.zeros((n // r, d), dtype=bool)
    for g in range(n // r):
        for j in range(d):
            col = a[g * r:(g + 1) * r, j]
            keys = [v.tobytes() for v in col]
            held = [i for i in range(r) if keys.count(keys[i]) >= f + 1 and np.isfinite(col[i])]
            finite = [float(v) for v in col if np.isfinite(v)]
            decoded[g, j] = float(col[held[0]]) if held else _median_of(finite)
            decodes[g, j] = bool(held) or len(finite) == r
    return decoded, decodes


def draco(x: Any, f: int) -> np.ndarray:
    r"""Draco with the repetition code (Chen, Wang, Charles, Papailiopoulos, "DRACO: Byzantine-resilient
    Distributed Training via Redundant Gradients", ICML 2018, §3), as :class:`aggregathor.gars.draco.Draco`.

    Per coordinate, the mean of the decoded values of the groups that decode it (:func:`draco_decode`); where no
    group does, the mean of the groups' finite medians (NaN if none is finite).
    """
    _matrix(x)
    decoded, decodes = draco_decode(x, f)
    out = np.empty(decoded.shape[1])
    for j in range(decoded.shape[1]):
        use = decodes[:, j] if decodes[:, j].any() else np.isfinite(decoded[:, j])
        vals = decoded[use, j]
        out[j] = sum(vals) / len(vals) if len(vals) else np.nan
    return out


# ------------------------------------------------------------------------------------------- registry
REFERENCES: dict[str, Callable[..., np.ndarray]] = {
    "average": average,
    "average-nan": average_nan,
    "median": median,
    "meamed": meamed,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "geometric-median": geometric_median,
    "centered-clipping": centered_clipping,
    "draco": draco,
}

WRAPPERS: dict[str, Callable[..., np.ndarray]] = {
    "nnm": nnm,
    "bucketing": bucketing,
    "clipping": clipping,
    "arc": arc,
}


def compose(name: str, x: Any, f: int, pre: Sequence[str | dict[str, Any]] = (), **params: Any) -> np.ndarray:
    """``REFERENCES[name]`` applied after the wrappers ``pre`` (names, or dicts with ``"name"`` and arguments).

    Each wrapper sees the ``f`` given, and so does the rule.
    """
    a = _matrix(x)
    for item in pre:
        spec = {"name": item} if isinstance(item, str) else dict(item)
        a = WRAPPERS[spec.pop("name")](a, f, **spec)
    return REFERENCES[name](a, f, **params)
