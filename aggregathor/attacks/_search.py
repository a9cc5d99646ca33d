r"""Line search of an attack's scale against a given rule (the ``-opt`` attacks).

For a family of Byzantine gradients :math:`B(s)` indexed by a scale :math:`s \ge 0` (ALIE's :math:`z`,
IPM's :math:`\varepsilon`), the attacker who knows the rule ``gar`` picks

.. math:: s^\star = \arg\max_{s \in S} \big\| \mathrm{gar}(H \cup B(s)) - \bar H \big\|_2

over a finite grid :math:`S`: by default a geometric grid (``start``, ``stop``, ``num``, as
:func:`numpy.geomspace`) plus the family's default scale, so that the tuned attack never does less damage
than the default one; ``grid`` gives :math:`S` explicitly instead. Every scale of the grid is tried (one
call of the rule each, on the ``(h + f, d)`` matrix honest rows first), ties go to the smallest scale (the
stealthiest), and the result of the last search is kept in ``last_scales``, ``last_damages`` and
``last_scale``. Damage is measured against the honest mean, the update the server would apply without
attackers; see :func:`aggregathor.attacks.base.damage`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from aggregathor.attacks.base import Attack, _check_f, as_honest, check_scalar, damage


def resolve_gar(who: str, gar: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(config, rule)`` for ``gar`` given as a callable rule or as a rule config dict (built by name)."""
    if gar is None:
        raise TypeError(f"{who} needs the rule to attack: {who}(gar=aggregathor.gars.get(name, n, f)) or "
                        "gar={'name': ..., 'n': ..., 'f': ...}")
    if isinstance(gar, dict):
        from aggregathor import gars

        cfg = dict(gar)
        return cfg, gars.get(**cfg)
    if not callable(gar):
        raise TypeError(f"{who}: gar must be a rule (a callable) or a rule config dict, got {type(gar).__name__}")
    cfg = gar.get_config() if callable(getattr(gar, "get_config", None)) else gar
    return cfg, gar


class ScaleSearch(Attack):
    """Base of the ``-opt`` attacks: subclasses define :meth:`forge_at` and :meth:`default_scale`."""

    scale_name: ClassVar[str] = "scale"
    default_start: ClassVar[float] = 0.1
    default_stop: ClassVar[float] = 10.0
    default_num: ClassVar[int] = 21

    def __init__(self, gar: Any = None, grid: Sequence[float] | None = None, start: float | None = None,
                 stop: float | None = None, num: int | None = None, include_default: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gar_config, self.gar = resolve_gar(self.name, gar)
        self.start = check_scalar(self.name, "start", self.default_start if start is None else start)
        self.stop = check_scalar(self.name, "stop", self.default_stop if stop is None else stop)
        if self.stop < self.start:
            raise ValueError(f"{self.name}: stop ({self.stop}) must be >= start ({self.start})")
        num = self.default_num if num is None else num
        if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 1:
            raise ValueError(f"{self.name}: num must be a positive int, got {num!r}")
        self.num = int(num)
        if grid is None:
            self.grid: tuple[float, ...] | None = None
        else:
            try:
                values = list(grid)
            except TypeError as exc:
                raise ValueError(f"{self.name}: grid must be a sequence of {self.scale_name} values") from exc
            if not values:
                raise ValueError(f"{self.name}: grid is empty")
            self.grid = tuple(check_scalar(self.name, f"grid {self.scale_name}", v, strict=False) for v in values)
        if not isinstance(include_default, bool):
            raise ValueError(f"{self.name}: include_default must be a bool, got {include_default!r}")
        self.include_default = include_default
        self.last_scales: np.ndarray | None = None
        self.last_damages: np.ndarray | None = None
        self.last_scale: float | None = None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gar": self._gar_config, "grid": None if self.grid is None else
                list(self.grid), "start": self.start, "stop": self.stop, "num": self.num,
                "include_default": self.include_default}

    # ------------------------------------------------------------------ family
    def default_scale(self, n: int, f: int) -> float | None:
        """The family's default scale for ``n`` workers of which ``f`` Byzantine (None: undefined)."""
        raise NotImplementedError

    def forge_at(self, honest: np.ndarray, f: int, scale: float) -> np.ndarray:
        """The ``(f, d)`` Byzantine rows of the family at ``scale``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ search
    def scales(self, h: int, f: int) -> np.ndarray:
        """The grid searched for ``h`` honest and ``f`` Byzantine gradients: sorted, without duplicates."""
        base = np.geomspace(self.start, self.stop, self.num) if self.grid is None else np.asarray(self.grid)
        extra = self.default_scale(h + f, f) if self.include_default else None
        if extra is not None:
            base = np.append(base, extra)
        return np.unique(base.astype(np.float64))

    def search(self, honest: Any, f: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scales, damages)``: the damage done to the rule at each scale of the grid."""
        x = self._validated(honest, f)
        scales = self.scales(x.shape[0], f)
        damages = np.array([damage(self.gar, x, self.forge_at(x, f, s).astype(x.dtype)) for s in scales])
        return scales, damages

    def _validated(self, honest: Any, f: int) -> np.ndarray:
        x = as_honest(honest, self.name)
        f = _check_f(f, self.name)
        if x.shape[0] < self.min_honest:
            raise ValueError(f"{self.name} needs at least {self.min_honest} honest gradient(s), got {x.shape[0]}")
        n_rule = getattr(self.gar, "n", None)
        if isinstance(n_rule, int | np.integer) and not isinstance(n_rule, bool) and n_rule != x.shape[0] + f:
            raise ValueError(f"{self.name}: the rule was built for n={n_rule} gradients, but the attack sees "
                             f"h + f = {x.shape[0]} + {f} = {x.shape[0] + f}")
        return x

    def forge(self, honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        scales, damages = self.search(honest, f)
        best = int(np.argmax(damages))  # first maximum: the smallest scale among ties
        self.last_scales, self.last_damages, self.last_scale = scales, damages, float(scales[best])
        return self.forge_at(honest, f, self.last_scale)
