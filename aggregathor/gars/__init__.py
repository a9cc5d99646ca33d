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
    """Names of the built-in rules and of those installed packages register as entry points (group
    ``aggregathor.gars``), sorted (the wrappers: :func:`aggregathor.gars.wrappers.names`)."""
    return REGISTRY.names()


def get(name: str, n: int, f: int, *, pre: Sequence[str | dict[str, Any]] = (), **kwargs: Any) -> GAR:
    """Build the rule ``name`` for ``n`` gradients of which ``f`` may be Byzantine.

    ``name`` is a built-in name, an entry-point name, or a reference to your own rule,
    ``path/to/file.py:attr`` or ``package.module:attr``, whose ``attr`` is a :class:`GAR` subclass or a
    factory called as ``attr(n, f, **kwargs)`` returning a GAR (or a GAR subclass, then called with
    ``(n, f)``). ``pre`` lists pre-aggregation wrappers applied in order before a built-in rule (names, or
    dicts with a ``"name"`` and the wrapper's arguments; see :mod:`aggregathor.gars.wrappers`). The rule is
    built for the ``(n', f')`` the wrappers hand it (bucketing with ``s`` gives ``ceil(n/s)`` rows, same f).
    Raises a one-line ValueError naming the known rules for an unknown name, naming the reference and what
    it found for bad user code, and naming the violated bound when ``(n, f)`` is out of the rule's reach.
    """
    if pre:
        REGISTRY.load()
        if name not in REGISTRY.table():
            REGISTRY.find(name, "--gar")  # an unknown name or bad user code: its own message
            raise ValueError(f"--gar {name}: pre-aggregation wrappers (pre=) apply to the built-in rules only; "
                             "drop pre or apply the wrappers inside your rule")
        # Wrappers may change (n, f) for the rule (bucketing: ceil(n/s) rows): the rule is built and its
        # bound checked for the (n', f') that reaches it.
        from aggregathor.gars.wrappers import compose

        return compose(name, n, f, pre, **kwargs)
    rule = REGISTRY.build(name, (n, f), kwargs, base=GAR, what="--gar",
                          expected="a GAR subclass or a factory(n, f) returning a GAR")
    rule.check()
    return rule
