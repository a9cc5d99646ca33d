"""Seeded, vectorised fault injection at the datagram layer.

A lossympi message is sent as ``count`` chunks, one UDP datagram each, with chunk indices
``0 .. count-1``. Before sending a message, the sender asks a :class:`FaultInjector` for a
:class:`SendPlan` that says which chunks are transmitted, in which order, which are sent twice, which are
held back for a second phase ``delay`` seconds later and which transmissions carry a flipped payload bit.

Everything here is pure numpy (no per-chunk Python loop) and deterministic: the plans an injector returns
for a peer depend only on ``(seed, peer)`` and on the sequence of calls made for that peer.

How one plan is drawn, for a peer whose spec is ``s`` (each step only draws random numbers when its
probability is non-zero, so a no-op spec consumes no randomness):

1. loss: each chunk is dropped independently with probability ``s.drop``, or, when ``s.burst`` is set,
   according to a Gilbert-Elliott two-state chain (``s.drop`` is then ignored). Dropped chunks are never
   transmitted;
2. delay: each surviving chunk is moved to the second phase with probability ``s.delay_prob``;
3. duplication: each surviving chunk is transmitted twice with probability ``s.duplicate`` (both copies in
   the chunk's phase, the copy right after the original unless reordering moves it);
4. reordering: in each phase, each transmission is selected with probability ``s.reorder`` and the
   selected ones are permuted among their own positions by a random cyclic permutation, so that every
   selected transmission moves when at least two are selected;
5. corruption: each transmission (every copy counts separately) is marked corrupted with probability
   ``s.corrupt``. The sender flips one payload bit of those, see :meth:`FaultInjector.corrupt_payload`.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

import numpy as np

__all__ = ["FaultInjector", "FaultSpec", "GilbertElliott", "SendPlan", "rank_seed"]

_INDEX_DTYPE = np.uint32

_STRING_SYNTAX = (
    "expected ';'-separated parts '[PEER:]KEY=VALUE[,KEY=VALUE...]' with keys drop=P, dup=P (or "
    "duplicate=P), reorder=P, delay=SECONDS:P, corrupt=P, ge=P_GB:P_BG[:LOSS_GOOD:LOSS_BAD] (or burst=...), "
    "where P are probabilities in [0, 1] and PEER a non-negative integer; a part without 'PEER:' is the "
    "default, e.g. 'drop=0.05,dup=0.01;2:ge=0.01:0.3'"
)


def rank_seed(seed: int, rank: int) -> int:
    """The fault injector seed of ``rank`` in a job seeded with ``seed``: every rank draws its own losses, and
    the same job seed gives the same losses. Use it wherever a job derives per-rank injectors."""
    return int(seed) * 7919 + int(rank)


def _check_real(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a finite float or raise naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name} must be a real number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    return result


def _check_probability(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a float in ``[0, 1]`` or raise a ``ValueError`` naming ``owner.name``."""
    result = _check_real(owner, name, value)
    if not 0.0 <= result <= 1.0:
        raise ValueError(f"{owner}.{name} must be a probability in [0, 1], got {value!r}")
    return result


def _readonly(array: np.ndarray) -> np.ndarray:
    """Mark ``array`` read-only and return it."""
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state (good/bad) burst-loss channel.

    The channel state is a Markov chain with one step per chunk. The first chunk's state is drawn from
    the stationary distribution, so that the loss process is stationary from the first chunk on.

    Parameters
    ----------
    p : float
        Probability of moving from the good to the bad state after a chunk, in ``[0, 1]``.
    r : float
        Probability of moving from the bad to the good state after a chunk, in ``[0, 1]``. Sojourns in the
        bad state last ``1 / r`` chunks on average.
    loss_good : float, optional
        Drop probability of a chunk sent in the good state (default 0).
    loss_bad : float, optional
        Drop probability of a chunk sent in the bad state (default 1).

    Notes
    -----
    The stationary loss is ``(r * loss_good + p * loss_bad) / (p + r)``. When ``p == r == 0`` the chain
    never moves and starts (and stays) in the good state.
    """

    p: float
    r: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = _check_probability("GilbertElliott", field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)

    def stationary_probability_bad(self) -> float:
        """Return the stationary probability of the bad state.

        Returns
        -------
        float
            ``p / (p + r)``, or 0 when ``p == r == 0`` (the chain then stays in the good state).
        """
        total = self.p + self.r
        return 0.0 if total == 0.0 else self.p / total

    def stationary_loss(self) -> float:
        """Return the long-run fraction of dropped chunks.

        Returns
        -------
        float
            ``(r * loss_good + p * loss_bad) / (p + r)``, or ``loss_good`` when ``p == r == 0``.
        """
        bad = self.stationary_probability_bad()
        return (1.0 - bad) * self.loss_good + bad * self.loss_bad

    def can_lose(self) -> bool:
        """Return whether this channel can drop any chunk at all.

        Returns
        -------
        bool
            False when ``loss_good == 0`` and the bad state either never drops or is never reached.
        """
        return self.loss_good > 0.0 or (self.loss_bad > 0.0 and self.p > 0.0)

    def sample_bad(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the channel state of ``count`` consecutive chunks.

        The chain is generated as alternating geometric sojourn times (run lengths), drawn in vectorised
        batches, and expanded with :func:`numpy.repeat`; there is no Python loop over chunks or runs.

        Parameters
        ----------
        count : int
            Number of chunks.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            Bool array of length ``count``, True where the chunk is sent in the bad state.
        """
        if count <= 0:
            return np.zeros(0, dtype=bool)
        p, r = self.p, self.r
        start_bad = bool(rng.random() < self.stationary_probability_bad()) if p + r > 0.0 else False
        # A sojourn of length k in a state left with probability q has P(k) = (1-q)^(k-1) q: Geometric(q).
        # q == 0 means the state is never left; a run of `count` chunks then covers the whole message.
        first_q, second_q = (r, p) if start_bad else (p, r)
        mean_pair = sum(1.0 / q if q > 0.0 else float(count) for q in (first_q, second_q))
        batches: list[np.ndarray] = []
        covered = 0
        while covered < count:
            pairs = int(min(count, math.ceil(1.25 * (count - covered) / mean_pair))) + 4
            runs = np.empty(2 * pairs, dtype=np.int64)
            runs[0::2] = rng.geometric(first_q, pairs) if first_q > 0.0 else count
            runs[1::2] = rng.geometric(second_q, pairs) if second_q > 0.0 else count
            np.minimum(runs, count, out=runs)  # keeps the cumulative sum far from overflow
            batches.append(runs)
            covered += int(runs.sum())
        lengths = np.concatenate(batches)
        # Every batch holds whole (first, second) pairs, so run i is in the start state iff i is even.
        needed = int(np.searchsorted(np.cumsum(lengths), count)) + 1
        states = np.zeros(needed, dtype=bool)
        states[0::2] = start_bad
        states[1::2] = not start_bad
        return np.repeat(states, lengths[:needed])[:count]

    def sample_drops(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Draw which of ``count`` consecutive chunks this channel drops.

        Parameters
        ----------
        count : int
            Number of chunks.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            Bool array of length ``count``, True where the chunk is dropped.
        """
        bad = self.sample_bad(count, rng)
        if self.loss_good == 0.0 and self.loss_bad == 1.0:
            return bad
        if self.loss_good == self.loss_bad:
            return rng.random(count) < self.loss_good
        return rng.random(count) < np.where(bad, self.loss_bad, self.loss_good)


@dataclass(frozen=True)
class FaultSpec:
    """Which faults to inject into the chunks of one message.

    Parameters
    ----------
    drop : float, optional
        Independent (Bernoulli) drop probability per chunk. Ignored when ``burst`` is set.
    burst : GilbertElliott or None, optional
        Burst-loss channel used instead of ``drop`` when set.
    duplicate : float, optional
        Probability that a non-dropped chunk is transmitted twice.
    reorder : float, optional
        Probability that a transmission is displaced: the selected transmissions of a phase are permuted
        among their own positions.
    delay : float, optional
        Seconds after the first phase at which delayed chunks are sent (finite, ``>= 0``).
    delay_prob : float, optional
        Probability that a non-dropped chunk is delayed.
    corrupt : float, optional
        Probability that one transmitted copy of a chunk is corrupted (one payload bit flipped).

    Raises
    ------
    ValueError
        If a probability is outside ``[0, 1]``, or ``delay`` is negative, or a value is not finite.
    TypeError
        If a value is not a real number, or ``burst`` is not a :class:`GilbertElliott`.
    """

    drop: float = 0.0
    burst: GilbertElliott | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    delay_prob: float = 0.0
    corrupt: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "delay_prob", "corrupt"):
            object.__setattr__(self, name, _check_probability("FaultSpec", name, getattr(self, name)))
        delay = _check_real("FaultSpec", "delay", self.delay)
        if delay < 0.0:
            raise ValueError(f"FaultSpec.delay must be a finite number of seconds >= 0, got {self.delay!r}")
        object.__setattr__(self, "delay", delay)
        if self.burst is not None and not isinstance(self.burst, GilbertElliott):
            kind = type(self.burst).__name__
            raise TypeError(f"FaultSpec.burst must be a GilbertElliott or None, got {kind}")

    def loses(self) -> bool:
        """Return whether this spec can drop chunks.

        Returns
        -------
        bool
            True when the active loss model (``burst`` if set, else ``drop``) can drop a chunk.
        """
        return self.burst.can_lose() if self.burst is not None else self.drop > 0.0

    def is_noop(self) -> bool:
        """Return whether every plan drawn from this spec is the identity.

        Returns
        -------
        bool
            True when no chunk can be dropped, delayed, duplicated, reordered or corrupted (``delay`` alone,
            with ``delay_prob == 0``, is a no-op).
        """
        return not (
            self.loses() or self.duplicate > 0.0 or self.reorder > 0.0 or self.delay_prob > 0.0
            or self.corrupt > 0.0
        )


@dataclass(frozen=True, eq=False)
class SendPlan:
    """How one message of ``count`` chunks is transmitted.

    Parameters
    ----------
    order : numpy.ndarray
        ``uint32`` chunk indices sent in the first phase, in send order. Duplicated chunks appear twice;
        dropped and delayed chunks do not appear.
    corrupt : numpy.ndarray
        Bool, same length as ``order``: True where that transmission is corrupted.
    delayed : numpy.ndarray
        ``uint32`` chunk indices sent in a second phase, ``delay`` seconds after the first, in send order.
    delayed_corrupt : numpy.ndarray
        Bool, same length as ``delayed``.
    delay : float
        Seconds between the two phases.
    dropped : numpy.ndarray
        Bool, length ``count``: True exactly where the chunk is never transmitted.

    Notes
    -----
    Plans returned by :meth:`FaultInjector.plan` hold read-only arrays.
    """

    order: np.ndarray
    corrupt: np.ndarray
    delayed: np.ndarray
    delayed_corrupt: np.ndarray
    delay: float
    dropped: np.ndarray

    @property
    def count(self) -> int:
        """Number of chunks of the message."""
        return int(self.dropped.shape[0])

    @property
    def transmissions(self) -> int:
        """Number of datagrams sent, both phases and all copies included."""
        return int(self.order.shape[0] + self.delayed.shape[0])

    def clean_delivered(self) -> np.ndarray:
        """Return which chunks have at least one uncorrupted transmission.

        Returns
        -------
        numpy.ndarray
            Bool array of length ``count``, True where at least one copy of the chunk is sent uncorrupted,
            in either phase.
        """
        result = np.zeros(self.count, dtype=bool)
        result[self.order[~self.corrupt]] = True
        result[self.delayed[~self.delayed_corrupt]] = True
        return result

    @classmethod
    def identity(cls, count: int, delay: float = 0.0) -> SendPlan:
        """Return the fault-free plan: every chunk once, in index order, nothing delayed or corrupted.

        Parameters
        ----------
        count : int
            Number of chunks.
        delay : float, optional
            Value of the ``delay`` attribute (no chunk is delayed whatever it is).

        Returns
        -------
        SendPlan
            The identity plan, with read-only arrays.
        """
        return cls(
            order=_readonly(np.arange(count, dtype=_INDEX_DTYPE)),
            corrupt=_readonly(np.zeros(count, dtype=bool)),
            delayed=_readonly(np.zeros(0, dtype=_INDEX_DTYPE)),
            delayed_corrupt=_readonly(np.zeros(0, dtype=bool)),
            delay=float(delay),
            dropped=_readonly(np.zeros(count, dtype=bool)),
        )


def _displace(sequence: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Move each element of ``sequence`` with probability ``probability`` (see module notes)."""
    if probability <= 0.0 or sequence.shape[0] < 2:
        return sequence
    selected = np.flatnonzero(rng.random(sequence.shape[0]) < probability)
    if selected.shape[0] < 2:
        return sequence
    # A random cyclic permutation of the selected positions: the value at cycle[i] goes to cycle[i + 1].
    cycle = rng.permutation(selected)
    result = sequence.copy()
    result[np.roll(cycle, -1)] = sequence[cycle]
    return result


def _mark(length: int, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``length`` independent Bernoulli(``probability``) draws, without drawing when it is 0."""
    if probability <= 0.0:
        return np.zeros(length, dtype=bool)
    if probability >= 1.0:
        return np.ones(length, dtype=bool)
    return rng.random(length) < probability


class FaultInjector:
    """Seeded source of :class:`SendPlan` objects, one random stream per destination peer.

    Parameters
    ----------
    default : FaultSpec or None, optional
        Spec for peers without their own entry in ``per_peer``; None means no faults.
    per_peer : Mapping[int, FaultSpec] or None, optional
        Specs of individual peers. A peer's spec replaces ``default`` entirely (it is not merged).
    seed : int, optional
        Non-negative seed. Peer ``n`` draws from ``numpy.random.default_rng(SeedSequence([seed, n]))``, so
        its plans depend only on ``seed``, ``n`` and the calls made for ``n``.

    Notes
    -----
    :meth:`plan` and :meth:`corrupt_payload` may be called from several threads.
    """

    def __init__(
        self,
        default: FaultSpec | None = None,
        per_peer: Mapping[int, FaultSpec] | None = None,
        seed: int = 0,
    ) -> None:
        if default is not None and not isinstance(default, FaultSpec):
            raise TypeError(f"default must be a FaultSpec or None, got {type(default).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        peers: dict[int, FaultSpec] = {}
        for peer, spec in (per_peer or {}).items():
            if not isinstance(spec, FaultSpec):
                raise TypeError(f"per_peer[{peer!r}] must be a FaultSpec, got {type(spec).__name__}")
            peers[self._check_peer(peer)] = spec
        self.default: FaultSpec = default if default is not None else FaultSpec()
        self.per_peer: Mapping[int, FaultSpec] = MappingProxyType(peers)
        self.seed: int = int(seed)
        self._rngs: dict[int, np.random.Generator] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultInjector(default={self.default!r}, per_peer={dict(self.per_peer)!r}, seed={self.seed})"

    @staticmethod
    def _check_peer(peer: object) -> int:
        if isinstance(peer, bool) or not isinstance(peer, numbers.Integral) or peer < 0:
            raise ValueError(f"peer must be a non-negative integer, got {peer!r}")
        return int(peer)

    def _rng(self, peer: int) -> np.random.Generator:
        rng = self._rngs.get(peer)
        if rng is None:
            rng = self._rngs[peer] = np.random.default_rng(np.random.SeedSequence([self.seed, peer]))
        return rng

    def is_noop(self) -> bool:
        """Return whether no peer ever gets a fault.

        Returns
        -------
        bool
            True when the default spec and every per-peer spec are no-ops.
        """
        return self.default.is_noop() and all(spec.is_noop() for spec in self.per_peer.values())

    def spec_for(self, peer: int) -> FaultSpec:
        """Return the spec that applies to messages sent to ``peer``.

        Parameters
        ----------
        peer : int
            Destination rank.

        Returns
        -------
        FaultSpec
            ``per_peer[peer]`` if present, else the default spec.
        """
        return self.per_peer.get(self._check_peer(peer), self.default)

    def plan(self, peer: int, count: int) -> SendPlan:
        """Draw the transmission plan of one message of ``count`` chunks to ``peer``.

        Parameters
        ----------
        peer : int
            Destination rank (non-negative).
        count : int
            Number of chunks of the message (non-negative).

        Returns
        -------
        SendPlan
            The plan, with read-only arrays. Deterministic given ``seed``, ``peer`` and the sequence of
            earlier calls for ``peer``; a no-op spec (or ``count == 0``) returns the identity plan and
            draws nothing. ``plan.delay`` is always the spec's ``delay``.

        Raises
        ------
        ValueError
            If ``peer`` or ``count`` is negative or not an integer, or ``count`` exceeds 2**32.
        """
        peer = self._check_peer(peer)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count <= 2**32:
            raise ValueError(f"count must be an integer in [0, 2**32], got {count!r}")
        count = int(count)
        spec = self.spec_for(peer)
        if spec.is_noop() or count == 0:
            return SendPlan.identity(count, spec.delay)
        with self._lock:
            return self._draw(spec, count, self._rng(peer))

    @staticmethod
    def _draw(spec: FaultSpec, count: int, rng: np.random.Generator) -> SendPlan:
        if spec.burst is not None:
            dropped = spec.burst.sample_drops(count, rng) if spec.burst.can_lose() else np.zeros(count, bool)
        else:
            dropped = _mark(count, spec.drop, rng)
        kept = np.flatnonzero(~dropped).astype(_INDEX_DTYPE)
        late = _mark(kept.shape[0], spec.delay_prob, rng)
        copies = 1 + _mark(kept.shape[0], spec.duplicate, rng).astype(np.intp)
        phases = []
        for indices, phase_copies in ((kept[~late], copies[~late]), (kept[late], copies[late])):
            sent = _displace(np.repeat(indices, phase_copies), spec.reorder, rng)
            phases.append((sent, _mark(sent.shape[0], spec.corrupt, rng)))
        (order, corrupt), (delayed, delayed_corrupt) = phases
        return SendPlan(
            order=_readonly(order),
            corrupt=_readonly(corrupt),
            delayed=_readonly(delayed),
            delayed_corrupt=_readonly(delayed_corrupt),
            delay=spec.delay,
            dropped=_readonly(dropped),
        )

    def corrupt_payload(self, peer: int, payload: bytes | bytearray | memoryview) -> bytes:
        """Return a copy of ``payload`` with one uniformly chosen bit flipped.

        The bit is drawn from ``peer``'s random stream, so corruption stays deterministic when the sender
        calls this for the transmissions that a plan marks as corrupted.

        Parameters
        ----------
        peer : int
            Destination rank whose stream is used.
        payload : bytes-like
            Chunk payload. An empty payload is returned unchanged (there is no bit to flip).

        Returns
        -------
        bytes
            The corrupted copy.
        """
        peer = self._check_peer(peer)
        data = bytearray(payload)
        if not data:
            return bytes(data)
        with self._lock:
            bit = int(self._rng(peer).integers(0, 8 * len(data)))
        data[bit >> 3] ^= 1 << (bit & 7)
        return bytes(data)

    @classmethod
    def from_string(cls, text: str, seed: int = 0) -> FaultInjector:
        """Build an injector from a compact description.

        Parameters
        ----------
        text : str
            ``';'``-separated parts ``[PEER:]KEY=VALUE[,KEY=VALUE...]``. A part without a ``PEER:`` prefix
            is the default spec; a part with one is the whole spec of that peer. Keys: ``drop=P``,
            ``dup=P`` (or ``duplicate``), ``reorder=P``, ``delay=SECONDS:P`` (delay and its probability),
            ``corrupt=P``, ``ge=P_GB:P_BG[:LOSS_GOOD:LOSS_BAD]`` (or ``burst``). Whitespace is ignored and
            an empty string means no faults. Example: ``"drop=0.05,dup=0.01;2:ge=0.01:0.3;3:drop=0.5"``.
        seed : int, optional
            Seed of the injector.

        Returns
        -------
        FaultInjector
            The injector.

        Raises
        ------
        ValueError
            On a malformed part, unknown or repeated key, bad value, repeated peer or repeated default,
            naming the offending token and the expected syntax.
        """
        if not isinstance(text, str):
            raise TypeError(f"fault description must be a str, got {type(text).__name__}")
        default: FaultSpec | None = None
        per_peer: dict[int, FaultSpec] = {}
        for raw_part in text.split(";"):
            part = "".join(raw_part.split())
            if not part:
                continue
            peer: int | None = None
            head, colon, rest = part.partition(":")
            if colon and "=" not in head:
                if not head.isdecimal():
                    raise ValueError(f"bad peer {head!r} in {raw_part.strip()!r}: {_STRING_SYNTAX}")
                peer, part = int(head), rest
                if peer in per_peer:
                    raise ValueError(f"peer {peer} given twice in {text!r}: {_STRING_SYNTAX}")
            elif default is not None:
                raise ValueError(f"more than one default part in {text!r}: {_STRING_SYNTAX}")
            spec = _parse_spec(part)
            if peer is None:
                default = spec
            else:
                per_peer[peer] = spec
        return cls(default=default, per_peer=per_peer, seed=seed)


_KEY_ALIASES = {
    "drop": "drop",
    "dup": "duplicate",
    "duplicate": "duplicate",
    "reorder": "reorder",
    "delay": "delay",
    "corrupt": "corrupt",
    "ge": "burst",
    "burst": "burst",
}


def _parse_numbers(token: str, value: str, arities: tuple[int, ...]) -> list[float]:
    """Split ``value`` on ':' into floats, requiring one of ``arities`` fields."""
    items = value.split(":")
    if len(items) not in arities:
        expected = " or ".join(str(n) for n in arities)
        raise ValueError(f"bad token {token!r}: needs {expected} ':'-separated numbers; {_STRING_SYNTAX}")
    try:
        return [float(item) for item in items]
    except ValueError:
        raise ValueError(f"bad number in token {token!r}; {_STRING_SYNTAX}") from None


def _parse_spec(part: str) -> FaultSpec:
    """Parse ``KEY=VALUE[,KEY=VALUE...]`` (whitespace already removed) into a :class:`FaultSpec`."""
    kwargs: dict[str, object] = {}
    for token in part.split(","):
        key, equals, value = token.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"bad token {token!r} in {part!r}: {_STRING_SYNTAX}")
        name = _KEY_ALIASES.get(key.lower())
        if name is None:
            raise ValueError(f"unknown key {key!r} in token {token!r}: {_STRING_SYNTAX}")
        if name in kwargs:
            raise ValueError(f"key {key!r} given twice in {part!r}: {_STRING_SYNTAX}")
        if name == "burst":
            values = _parse_numbers(token, value, (2, 4))
            try:
                kwargs[name] = GilbertElliott(*values)
            except ValueError as error:
                raise ValueError(f"bad value in token {token!r}: {error}; {_STRING_SYNTAX}") from None
        elif name == "delay":
            kwargs["delay"], kwargs["delay_prob"] = _parse_numbers(token, value, (2,))
        else:
            (kwargs[name],) = _parse_numbers(token, value, (1,))
    if "burst" in kwargs and "drop" in kwargs:
        raise ValueError(f"'drop' and 'ge' are exclusive (ge replaces drop) in {part!r}: {_STRING_SYNTAX}")
    try:
        return FaultSpec(**kwargs)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"bad value in {part!r}: {error}; {_STRING_SYNTAX}") from None
