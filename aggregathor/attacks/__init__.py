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
    """Names of the registered attacks, sorted."""
    return REGISTRY.names()


def get(name: str, **params: Any) -> Attack:
    """Build the attack ``name`` with its parameters (``get(**attack.get_config())`` rebuilds ``attack``).

    Raises ValueError naming the known attacks for an unknown name, TypeError for an unknown parameter and
    ValueError for a bad parameter value.
    """
    return REGISTRY.get(name)(**params)
