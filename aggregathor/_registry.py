"""Registries of named classes (rules, wrappers, attacks, experiments): one module per entry, found by name.

A package keeps one :class:`Registry`; its modules decorate their classes with ``@REGISTRY.register`` (the
class's ``name`` attribute is the key), and :meth:`Registry.get` imports every public module of the package
before looking a name up, so an entry is available without importing its module by hand (the shape of
Flower's ``strategy/`` and ByzFL's aggregators).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class.

    Parameters
    ----------
    kind : str
        What the entries are, for messages ("aggregation rule", "attack", ...).
    package : str, optional
        Package whose public modules (not starting with ``_``, not in ``private``) define the entries; imported
        by :meth:`load`. ``None``: entries are registered by whoever imports their module.
    private : iterable of str
        Modules of ``package`` that define no entry.
    """

    def __init__(self, kind: str, package: str | None = None, private: Iterable[str] = ()) -> None:
        self.kind = kind
        self.package = package
        self.private = frozenset(private)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` available under ``cls.name``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name in self._entries:
            raise ValueError(f"{self.kind} name {name!r} is empty or already registered")
        self._entries[name] = cls
        return cls

    def load(self) -> None:
        """Import every public module of the package (once), which registers their classes."""
        if self._loaded or self.package is None:
            return
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name not in self.private:
                importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True

    def table(self) -> dict[str, T]:
        """A copy of what is registered so far (no import)."""
        return dict(self._entries)

    def names(self) -> list[str]:
        """Every name, sorted (after :meth:`load`)."""
        self.load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The class registered as ``name``; ValueError naming the known ones otherwise."""
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None
