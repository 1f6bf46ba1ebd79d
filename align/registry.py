"""A tiny name → factory registry, so configs select parts by name.

Used by ``align`` (aligners, connectors), ``fusion`` (strategies) and ``experiments`` (frozen encoders,
``experiments.encoders.ENCODERS``), all four with discovery. An unknown name fails with the list of known ones,
before any work is done.

**Discovery: the decorator line is the only registration.** A registry made with ``package=`` and ``symbol=``
(e.g. ``Registry("aligner", package="align", symbol="ALIGNERS")``) imports, on its first lookup, every public
module (name not starting with ``_``) of that package whose code names ``symbol`` (an import, a name or an
attribute; checked with :mod:`ast`, comments and strings do not count) — a module that registers an entry has to
name the registry to decorate with it, so a new file ``align/my_aligner.py`` holding
``@ALIGNERS.register("mine")`` is found with no list to edit, while modules that do not register anything (and
their heavy imports) are left alone. A lookup of an unknown name rescans for modules added since.

Parts outside the toolkit register from the user's own module: ``plugins: [my_parts]`` in a run config (or
``ALIGNFUSE_PLUGINS=my_parts,other.py``) imports them before the config is validated
(:func:`import_plugins`).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PLUGINS_ENV = "ALIGNFUSE_PLUGINS"


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of part.

    Args:
        kind: what an entry is, for messages (``"aligner"``).
        package: the package whose modules register entries (discovered on first lookup, see module docstring).
        symbol: the registry's name in that package (``"ALIGNERS"``); only modules whose code names it are
            imported.
        modules: extra modules to import on first lookup (parts that live outside ``package``).
    """

    def __init__(self, kind: str, package: str | None = None, symbol: str | None = None,
                 modules: tuple[str, ...] = ()) -> None:
        if (package is None) != (symbol is None):
            raise ValueError("give both package and symbol (discovery needs the registry's name), or neither")
        self.kind = kind
        self.package, self.symbol = package, symbol
        self._entries: dict[str, Callable[..., T]] = {}
        self._modules = tuple(modules)
        self._scanned: set[str] = set()  # module names of ``package`` already looked at
        self._loaded = False

    # ---- discovery -----------------------------------------------------------------------------------------
    def _load(self, rescan: bool = False) -> None:
        """Import the registering modules (once; ``rescan``: also modules added to the package since)."""
        if self._loaded and not rescan:
            return
        self._loaded = True
        for mod in self._modules:
            importlib.import_module(mod)
        for mod in self._discover():
            importlib.import_module(mod)

    def _discover(self) -> list[str]:
        """Not yet scanned public modules of ``package`` whose code names ``symbol``."""
        if self.package is None:
            return []
        pkg = importlib.import_module(self.package)
        found = []
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            name = f"{self.package}.{info.name}"
            if info.name.startswith("_") or name in self._scanned:
                continue
            self._scanned.add(name)
            if name in sys.modules or _mentions(info, self.symbol):
                found.append(name)
        return found

    # ---- entries -------------------------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REG.register("cca")`` above a class or factory function."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            old = self._entries.get(name)
            if old is not None and _same_definition(old, factory):
                log.debug("%s %r re-registered by a re-import of %s", self.kind, name, factory.__module__)
            elif old is not None:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {_where(old)}); "
                                 f"{_where(factory)} registers it again")
            self._entries[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        if name not in self._entries:
            self._load(rescan=True)
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        if name not in self:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names()) or '(none)'}"
            )
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)


def _mentions(info: pkgutil.ModuleInfo, symbol: str) -> bool:
    """Whether module ``info``'s code names ``symbol`` (an import, a name or an attribute; comments and strings do
    not count). Modules without readable Python source count as naming it."""
    spec = info.module_finder.find_spec(info.name)  # type: ignore[call-arg]
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not str(origin).endswith(".py"):
        return True  # a package, a compiled or an extension module: import it to be safe
    try:
        text = Path(origin).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    if symbol not in text:
        return False
    try:
        tree = ast.parse(text, filename=str(origin))
    except SyntaxError:
        return True  # let the import report the error
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == symbol) or (
                isinstance(node, ast.Attribute) and node.attr == symbol) or (
                isinstance(node, ast.alias) and symbol in (node.name.rsplit(".", 1)[-1], node.asname)):
            return True
    return False


def _where(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same class/function defined again by importing its module a second time (e.g. under another name)."""
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and _source_file(a) == _source_file(b)


def _source_file(obj: Any) -> str | None:
    mod = sys.modules.get(getattr(obj, "__module__", ""))
    f = getattr(mod, "__file__", None)
    return str(Path(f).resolve()) if f else None


# ------------------------------------------------------------------------------------------------ plugins


def plugin_names(configured: Iterable[str] = ()) -> list[str]:
    """``configured`` plus the entries of ``$ALIGNFUSE_PLUGINS`` (comma separated), each once, in order."""
    env = [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]
    return list(dict.fromkeys([*configured, *env]))


def import_plugins(names: Iterable[str]) -> list[str]:
    """Import the user's part modules, so their ``@REG.register`` lines run. Returns the names imported.

    Each name is a module on ``sys.path`` (``my_parts``, ``lab.parts``) or a path to a ``.py`` file (relative to
    the working directory); a failing import raises ``ImportError`` naming the plugin.
    """
    done = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ImportError(f"plugin {name!r}: expected a module name or a path to a .py file")
        try:
            if name.endswith(".py"):
                _import_file(Path(name))
            else:
                importlib.import_module(name)
        except ImportError:
            raise
        except Exception as e:  # a plugin that fails while registering: say which
            raise ImportError(f"plugin {name!r} failed on import: {type(e).__name__}: {e}") from e
        done.append(name)
    return done


def _import_file(path: Path) -> None:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"plugin file {path} does not exist")
    mod_name = f"alignfuse_plugin_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
