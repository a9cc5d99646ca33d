"""Byzantine-resilient gradient aggregation rules (GARs), one module per rule, with a registry by name.

``aggregathor.gars.get("multi-krum", n=20, f=4)`` builds a rule; ``names()`` lists them. Each rule is a
:class:`~aggregathor.gars.base.GAR`: call it on an ``(n, d)`` tensor (or a list of n tensors) to get the
``(d,)`` aggregate. Pre-aggregation wrappers compose with any rule: ``get("krum", n, f, pre=["nnm"])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aggregathor.gars.base import GAR, REGISTRY, as_matrix, register, registry

__all__ = ["GAR", "as_matrix", "get", "names", "register", "registry"]

def names() -> list[str]:
    """Names of the registered rules, sorted (the wrappers: :func:`aggregathor.gars.wrappers.names`)."""
    return REGISTRY.names()


def get(name: str, n: int, f: int, *, pre: Sequence[str | dict[str, Any]] = (), **kwargs: Any) -> GAR:
    """Build the rule ``name`` for ``n`` gradients of which ``f`` may be Byzantine.

    ``pre`` lists pre-aggregation wrappers applied in order before the rule (names, or dicts with a
    ``"name"`` and the wrapper's arguments; see :mod:`aggregathor.gars.wrappers`). The rule is built for
    the ``(n', f')`` the wrappers hand it (bucketing with ``s`` gives ``ceil(n/s)`` rows, same f). Raises
    ValueError naming the known rules for an unknown name, and the violated bound when ``(n, f)`` is out of
    the rule's reach.
    """
    cls = REGISTRY.get(name)
    if pre:
        # Wrappers may change (n, f) for the rule (bucketing: ceil(n/s) rows): the rule is built and its
        # bound checked for the (n', f') that reaches it.
        from aggregathor.gars.wrappers import compose

        return compose(name, n, f, pre, **kwargs)
    rule = cls(n, f, **kwargs)
    rule.check()
    return rule
