"""Byzantine attacks in gradient space, one module per family, with a registry by name.

``aggregathor.attacks.get("alie")`` builds an attack; ``names()`` lists them. Each attack is an
:class:`~aggregathor.attacks.base.Attack`: ``attack(honest, f, rng)`` turns the ``(h, d)`` honest gradients
of a step into the ``(f, d)`` Byzantine ones. The "optimal" variants line-search their scale against a given
rule: ``get("alie-opt", gar=aggregathor.gars.get("median", n, f))``.

Registered: ``nan``, ``inf`` (non-finite rows), ``gaussian`` (noise), ``sign-flip`` and ``reverse``
(negated gradients), ``alie`` (A Little Is Enough), ``ipm`` (inner product manipulation), ``mimic`` (copy
one honest worker), ``alie-opt`` and ``ipm-opt`` (scale tuned against a rule).
"""

from __future__ import annotations

from typing import Any

from aggregathor.attacks.base import REGISTRY, Attack, as_honest, as_rng, damage, register, registry

__all__ = ["Attack", "as_honest", "as_rng", "damage", "get", "names", "register", "registry"]

def names() -> list[str]:
    """Names of the built-in attacks and of those installed packages register as entry points (group
    ``aggregathor.attacks``), sorted."""
    return REGISTRY.names()


def get(name: str, **params: Any) -> Attack:
    """Build the attack ``name`` with its parameters (``get(**attack.get_config())`` rebuilds a built-in one).

    ``name`` is a built-in name, an entry-point name, or a reference to your own attack,
    ``path/to/file.py:attr`` or ``package.module:attr``, whose ``attr`` is an :class:`Attack` instance, an
    ``Attack`` subclass or a factory of either (called with ``params``). Raises a one-line ValueError naming
    the known attacks for an unknown name or naming the reference and what it found, TypeError for an
    unknown parameter of a built-in attack and ValueError for a bad parameter value.
    """
    return REGISTRY.build(name, (), params, base=Attack, what="--attack",
                          expected="an Attack, an Attack subclass or a factory of either")
