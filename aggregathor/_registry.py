"""Registries of named classes (rules, wrappers, attacks, experiments): one module per entry, found by name,
plus the user's own code, named by reference or registered by an installed package.

A package keeps one :class:`Registry`; its modules decorate their classes with ``@REGISTRY.register`` (the
class's ``name`` attribute is the key), and :meth:`Registry.get` imports every public module of the package
before looking a name up, so an entry is available without importing its module by hand (the shape of
Flower's ``strategy/`` and ByzFL's aggregators).

Beyond the built-in names, :meth:`Registry.build` (behind ``experiments.get``, ``gars.get`` and
``attacks.get``) accepts:

- a reference ``path/to/file.py:attr`` or ``package.module:attr`` (``attr`` may be dotted): the file is
  imported under a module name derived from its absolute path (:func:`file_module_name`), so every process
  that resolves the same reference gets the same module; the package module is imported as usual;
- the name of an entry point that an installed package declares in the registry's group
  (``aggregathor.experiments``, ``aggregathor.gars``, ``aggregathor.attacks``).

Only code the user names (on the command line or in Python) is imported: never resolve a reference that
came over the network.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "describe", "file_module_name", "instantiate", "is_reference", "load_reference", "reference_of"]

T = TypeVar("T", bound=type)

_IMPORT_LOCK = threading.RLock()
_MAX_LISTED = 20


def is_reference(name: str) -> bool:
    """Whether ``name`` is a ``module:attr`` reference (it holds a colon) rather than a registered name."""
    return isinstance(name, str) and ":" in name


def file_module_name(path: str) -> str:
    """The module name a ``.py`` file is imported under: its stem plus a hash of its real absolute path.

    Stable across processes and hosts that see the file at the same path; distinct for distinct files.
    """
    real = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0])
    return f"aggregathor_user_{stem}_{hashlib.sha256(real.encode()).hexdigest()[:12]}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


#: The user files and modules being imported now to resolve a reference (innermost last). While one is, training must
#: not start: a file that calls :func:`aggregathor.train` at import (without the ``__main__`` guard) would otherwise
#: start a job in every rank that imports it, recursively.
importing: list[str] = []


def _run_import(what: str, load: Callable[[], types.ModuleType]) -> types.ModuleType:
    importing.append(what)
    try:
        return load()
    finally:
        importing.pop()


def _import_file(path: str, where: str) -> types.ModuleType:
    """Import the ``.py`` file ``path`` once per process under :func:`file_module_name`."""
    real = os.path.realpath(path)
    if not real.endswith(".py"):
        raise ValueError(f"{where}: {path} is not a .py file; name a Python file or a module")
    if not os.path.isfile(real):
        raise ValueError(f"{where}: no file {path} (looked for {real})")
    name = file_module_name(real)
    with _IMPORT_LOCK:
        module = sys.modules.get(name)
        if module is not None:
            return module
        spec = importlib.util.spec_from_file_location(name, real)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
            raise ValueError(f"{where}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses and pickle look the module up
        if os.path.dirname(real) not in sys.path:  # its sibling modules import, as under `python file.py`
            sys.path.append(os.path.dirname(real))
        try:
            _run_import(path, lambda: spec.loader.exec_module(module) or module)
        except Exception as exc:
            del sys.modules[name]
            raise ValueError(f"{where}: importing {path} raised {_first_line(exc)}") from exc
    return module


def _import(module: str, where: str) -> types.ModuleType:
    """The module a reference names: a file path (``.py`` or holding a slash) or a dotted module name."""
    if module.endswith(".py") or "/" in module or os.sep in module:
        return _import_file(module, where)
    try:
        return _run_import(module, lambda: importlib.import_module(module))
    except ImportError as exc:
        raise ValueError(f"{where}: cannot import {module}: {_first_line(exc)}") from exc
    except Exception as exc:
        raise ValueError(f"{where}: importing {module} raised {_first_line(exc)}") from exc


def _public_names(obj: Any) -> str:
    names = sorted(n for n in dir(obj) if not n.startswith("_")
                   and not isinstance(getattr(obj, n, None), types.ModuleType))
    if not names:
        return "no public names"
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def load_reference(ref: str, what: str) -> Any:
    """The object a ``path/to/file.py:attr`` or ``package.module:attr`` reference names.

    ``what`` names the option in messages (``"--experiment"``). Raises a one-line ValueError naming the
    reference and what was found when the module cannot be imported or has no such attribute.
    """
    where = f"{what} {ref}"
    module, _, attr = ref.rpartition(":")
    if not module or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"{where}: expected path/to/file.py:attr or package.module:attr")
    obj: Any = _import(module, where)
    owner = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: {owner} has no attribute {part!r} (found: {_public_names(obj)})")
        obj, owner = getattr(obj, part), f"{owner}:{part}" if owner == module else f"{owner}.{part}"
    return obj


def describe(obj: Any) -> str:
    """A few words saying what ``obj`` is, for messages ("the class Foo", "a function", "an int")."""
    if obj is None:
        return "None"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__}"
    if inspect.isroutine(obj):
        return "a function"
    name = type(obj).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> Any:
    """``fn(*args, **kwargs)`` for user code, after checking that the call fits its signature."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        shown = ", ".join([*map(repr, args), *(f"{k}=..." for k in kwargs)])
        raise ValueError(f"{where}: cannot call {getattr(fn, '__qualname__', fn)!s}({shown}): {exc}") from None
    except ValueError:  # no signature to check (some builtins): let the call itself decide
        pass
    return fn(*args, **kwargs)


def instantiate(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, base: type, where: str, label: str,
                expected: str) -> Any:
    """Build a ``base`` instance from user code ``obj``: a ``base`` subclass (called with the arguments), a
    ``base`` instance (taken as is when there are no arguments) or a factory (a function called with the
    arguments, returning an instance or a subclass, which is then called with ``args``).

    Raises a one-line ValueError starting with ``where`` and saying what ``obj`` (named ``label``) is otherwise.
    """
    if isinstance(obj, type) and issubclass(obj, base):
        return _call(obj, args, kwargs, where)
    if isinstance(obj, base):
        if not args and not kwargs:
            return obj
        raise ValueError(f"{where}: {label!r} is already built ({describe(obj)}) and takes no arguments; "
                         "name its class or a factory instead")
    if callable(obj) and not isinstance(obj, type):
        result = _call(obj, args, kwargs, where)
        if isinstance(result, base):
            return result
        if isinstance(result, type) and issubclass(result, base):
            return _call(result, args, {}, where)
        found = describe(result) if result is None or isinstance(result, type) else type(result).__name__
        raise ValueError(f"{where}: {label!r} is a function returning {found}, expected {expected}")
    raise ValueError(f"{where}: {label!r} is {describe(obj)}, expected {expected}")


def reference_of(obj: Any) -> str | None:
    """A ``module:attr`` reference to ``obj`` (``/abs/file.py:attr`` for the main script or a file imported
    by reference), so that another process can rebuild it; ``None`` when no module binds ``obj`` at top level.
    """
    main = sys.modules.get("__main__")
    for module in [main, *list(sys.modules.values())]:
        name = next((n for n, v in list(vars(module).items()) if v is obj and not n.startswith("_")), None) \
            if module is not None else None
        if name is None:
            continue
        path = getattr(module, "__file__", None)
        if module is main or module.__name__.startswith("aggregathor_user_"):
            if path:
                return f"{os.path.realpath(path)}:{name}"
            continue
        return f"{module.__name__}:{name}"
    return None


class Registry(Generic[T]):
    """Name -> class, plus the entry points of an installed package and ``module:attr`` references.

    Parameters
    ----------
    kind : str
        What the entries are, for messages ("aggregation rule", "attack", ...).
    package : str, optional
        Package whose public modules (not starting with ``_``, not in ``private``) define the entries; imported
        by :meth:`load`. ``None``: entries are registered by whoever imports their module.
    private : iterable of str
        Modules of ``package`` that define no entry.
    group : str, optional
        Entry-point group whose names :meth:`names` lists and :meth:`find` loads; default ``package`` (so
        ``aggregathor.gars`` for the rules). ``""``: none.
    """

    def __init__(self, kind: str, package: str | None = None, private: Iterable[str] = (),
                 group: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self.private = frozenset(private)
        self.group = (package or "") if group is None else group
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

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The installed packages' entry points of :attr:`group` by name (a built-in name shadows them)."""
        if not self.group:
            return {}
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            found.setdefault(ep.name, ep)
        return found

    def names(self) -> list[str]:
        """Every name, built-in and entry point, sorted (after :meth:`load`)."""
        self.load()
        return sorted(set(self._entries) | set(self.entry_points()))

    def _unknown(self, name: str) -> ValueError:
        hint = "; or name your own as path/to/file.py:attr or package.module:attr" if self.group else ""
        return ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{hint}")

    def get(self, name: str) -> T:
        """The class registered as ``name``; ValueError naming the known ones otherwise."""
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise self._unknown(name) from None

    def find(self, name: str, what: str) -> tuple[Any, str, str]:
        """``(object, where, label)`` for a registered name, an entry-point name or a ``module:attr``
        reference: ``where`` is ``what`` (the option, ``"--gar"``) plus how ``name`` was resolved, ``label`` the
        object's own name, both for the caller's messages. One-line ValueError when nothing matches or the
        import fails.
        """
        self.load()
        if name in self._entries:
            return self._entries[name], f"{what} {name}", name
        ep = self.entry_points().get(name)
        if ep is not None:
            where = f"{what} {name} (entry point {ep.value})"
            try:
                return ep.load(), where, ep.value.rpartition(":")[2] or name
            except Exception as exc:
                raise ValueError(f"{where}: cannot be loaded: {_first_line(exc)}") from exc
        if is_reference(name):
            return load_reference(name, what), f"{what} {name}", name.rpartition(":")[2]
        if isinstance(name, str) and name.endswith(".py"):
            raise ValueError(f"{what} {name}: name the object in the file, as {name}:attr")
        raise self._unknown(name)

    def build(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, base: type, what: str,
              expected: str) -> Any:
        """A ``base`` instance for ``name``: a registered class called with the arguments, or user code (an
        entry point or a reference) built by :func:`instantiate`."""
        obj, where, label = self.find(name, what)
        if name in self._entries:
            return obj(*args, **kwargs)
        return instantiate(obj, args, kwargs, base=base, where=where, label=label, expected=expected)
