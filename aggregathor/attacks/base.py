"""The attack interface and its registry.

An attack forges the ``f`` Byzantine gradients of one step from the ``h`` honest ones (the usual omniscient
threat model of the literature: the attacker sees every honest gradient before sending its own). Attacks are
numpy-first, because they run in worker processes and in simulation as well as next to the rules:

- ``attack(honest, f, rng=None)`` takes an ``(h, d)`` array (a TensorFlow tensor or anything
  :func:`numpy.asarray` reads is converted) and returns a fresh ``(f, d)`` array of the honest dtype
  (integer input is promoted to float64). ``f = 0`` returns an empty ``(0, d)`` array.
- Randomness comes only from ``rng`` (a :class:`numpy.random.Generator`, or an int seed); with the same
  ``rng`` state every attack returns the same rows. ``rng=None`` draws from a fresh, unseeded generator
  (only the random attacks use it).
- ``get_config()`` returns the attack's name and parameters: ``aggregathor.attacks.get(**cfg)`` rebuilds it.
- Bad shapes, dtypes or parameters raise ``ValueError`` (``TypeError`` for an unknown parameter) naming
  the attack and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from aggregathor._registry import Registry

__all__ = ["Attack", "as_honest", "as_rng", "damage", "register", "registry"]

#: The registered classes by name; the public modules of ``aggregathor.attacks`` register theirs.
REGISTRY: Registry[type[Attack]] = Registry("attack", "aggregathor.attacks", ("base"))


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as ``aggregathor.attacks.get(cls.name, ...)``."""
    return REGISTRY.register(cls)


def registry() -> dict[str, type[Attack]]:
    """A copy of the name -> class registry (what is imported so far)."""
    return REGISTRY.table()


def _to_numpy(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray) and hasattr(x, "numpy"):  # tf.Tensor / tf.Variable (eager)
        x = x.numpy()
    return np.asarray(x)


def as_honest(honest: Any, who: str = "attack") -> np.ndarray:
    """The honest gradients as a floating ``(h, d)`` numpy array (no copy when already one)."""
    try:
        x = _to_numpy(honest)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{who}: honest gradients must be an (h, d) array, could not convert: {exc}") from exc
    if x.ndim != 2:
        raise ValueError(f"{who}: honest gradients must be an (h, d) matrix (one row per honest worker), "
                         f"got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{who}: gradients must have d >= 1 coordinates, got shape {x.shape}")
    if x.dtype.kind in "biu":
        x = x.astype(np.float64)
    elif x.dtype.kind != "f":
        raise ValueError(f"{who}: honest gradients must be real numbers, got dtype {x.dtype}")
    return x


def _check_f(f: Any, who: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
        raise ValueError(f"{who}: f (the number of Byzantine gradients) must be a non-negative int, got {f!r}")
    return int(f)


def as_rng(rng: Any, who: str = "attack") -> np.random.Generator:
    """``rng`` as a Generator: a Generator itself, a fresh one seeded by an int, or a fresh unseeded one."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{who}: rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def check_scalar(who: str, name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> float:
    """``value`` as a finite float ``> low`` (``>= low`` when not strict), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if strict else v >= low)
    if not ok:
        raise ValueError(f"{who}: {name} must be finite and {'>' if strict else '>='} {low}, got {value!r}")
    return v


def damage(gar: Callable[[Any], Any], honest: Any, byzantine: Any) -> float:
    r"""How far ``gar`` is pushed from the honest mean: :math:`\|\mathrm{gar}(H \cup B) - \bar H\|_2`.

    ``gar`` is called on the ``(h + f, d)`` matrix of the honest rows followed by the Byzantine rows (the
    rules of :mod:`aggregathor.gars` are invariant to the order of their rows, up to ties). A non-finite
    aggregate counts as infinite damage.
    """
    h = as_honest(honest, "damage")
    b = as_honest(byzantine, "damage")
    if b.shape[1] != h.shape[1]:
        raise ValueError(f"damage: honest gradients have d={h.shape[1]} but Byzantine ones d={b.shape[1]}")
    x = np.concatenate([h, b.astype(h.dtype, copy=False)])
    agg = _to_numpy(gar(x)).astype(np.float64, copy=False).reshape(-1)
    if agg.shape != (h.shape[1],):
        raise ValueError(f"damage: the rule returned shape {agg.shape}, expected ({h.shape[1]},)")
    dev = float(np.linalg.norm(agg - h.mean(axis=0, dtype=np.float64)))
    return dev if math.isfinite(dev) else math.inf


class Attack:
    """Base class of the attacks: validates the call, then lets :meth:`forge` build the ``(f, d)`` rows.

    Subclasses set ``name``, ``min_honest`` (the fewest honest rows the attack can work from), take their
    parameters as keyword arguments and override :meth:`forge` and :meth:`get_config`.
    """

    name: ClassVar[str] = ""
    min_honest: ClassVar[int] = 1

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected arguments {sorted(kwargs)}")

    def get_config(self) -> dict[str, Any]:
        """Keras-style configuration: ``aggregathor.attacks.get(**cfg)`` rebuilds the attack."""
        return {"name": self.name}

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        """The ``(f, d)`` Byzantine rows from the validated ``(h, d)`` honest rows, ``f >= 1``."""
        raise NotImplementedError

    def __call__(self, honest: Any, f: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """The ``f`` Byzantine gradients, an ``(f, d)`` array, forged from the ``(h, d)`` honest ones."""
        x = as_honest(honest, self.name)
        f = _check_f(f, self.name)
        if x.shape[0] < self.min_honest:
            raise ValueError(f"{self.name} needs at least {self.min_honest} honest gradient(s), got {x.shape[0]}")
        d = x.shape[1]
        if f == 0:
            return np.empty((0, d), dtype=x.dtype)
        out = np.asarray(self.forge(x, f, as_rng(rng, self.name)))
        if out.shape != (f, d):  # pragma: no cover - a bug in a subclass
            raise RuntimeError(f"{self.name} forged shape {out.shape}, expected {(f, d)}")
        return out.astype(x.dtype, copy=False)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"
