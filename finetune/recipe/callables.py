"""`module:function` named in a recipe: where the module is found, importing it, checking what it takes.

One rule for every user function a recipe names (eval metrics now, reward functions later): a
module is looked for first beside the recipe file that names it, like every other relative path,
then among the installed packages. The loader rewrites a module found beside the recipe to its
absolute file (`/exp/mymetrics.py:first_word`), so the resolved recipe a run saves still finds it
from any directory; its short name (`mymetrics:first_word`) is what tables and summaries show.

Nothing here imports torch; the user's module may import what it likes.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
SOURCE_SUFFIX = ".py"


class CallableError(ValueError):
    """A `module:function` that cannot be found, imported or called as required; the message says why."""


def split(spec: str) -> tuple[str, str]:
    """`module:function` -> (module, function); the module may also be a path to a .py file."""
    module, sep, function = spec.rpartition(":")
    if not sep or not module or not DOTTED.fullmatch(function):
        raise CallableError(f"expected module:function, got {spec!r}")
    if not module.endswith(SOURCE_SUFFIX) and not DOTTED.fullmatch(module):
        raise CallableError(f"{module!r} is neither a module name (a.b.c) nor a .py file")
    return module, function


def locate(spec: str, directory: Path) -> str:
    """The spec to keep: a module found beside the recipe becomes its absolute file; else it is left as is.

    `directory` is the folder of the recipe file that names the spec (the working directory for `--set`).
    A spec that is not of the module:function form is returned unchanged, for `check` to report.
    """
    try:
        module, function = split(spec)
    except CallableError:
        return spec
    if module.endswith(SOURCE_SUFFIX):
        return f"{(directory / module).expanduser().resolve()}:{function}"
    parts = module.split(".")
    for candidate in (directory.joinpath(*parts).with_suffix(SOURCE_SUFFIX), directory.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return f"{candidate.resolve()}:{function}"
    return spec


def short_name(spec: str) -> str:
    """What a person reads: `mymetrics:first_word` for `/exp/mymetrics.py:first_word`."""
    module, _, function = spec.rpartition(":")
    if not module.endswith(SOURCE_SUFFIX):
        return spec
    path = Path(module)
    name = path.parent.name if path.name == "__init__.py" else path.stem
    return f"{name}:{function}"


def load(spec: str, parameters: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Import the spec's module and return its function, checked to accept `parameters` positionally."""
    module_name, function = split(spec)
    module = _import_file(Path(module_name)) if module_name.endswith(SOURCE_SUFFIX) else _import_name(module_name)
    where = getattr(module, "__file__", None) or module_name
    if not hasattr(module, function):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        shown = f"; it defines {', '.join(public)}" if public else ""
        raise CallableError(f"{where} has no function {function!r}{shown}")
    fn = getattr(module, function)
    if not callable(fn):
        raise CallableError(f"{function!r} in {where} is a {type(fn).__name__}, not a function")
    if parameters:
        _check_parameters(fn, function, parameters)
    return fn


def _check_parameters(fn: Callable[..., Any], name: str, parameters: tuple[str, ...]) -> None:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        kind = "a generator" if inspect.isgeneratorfunction(fn) else "async"
        raise CallableError(f"{name} is {kind}: it must be a plain function that returns its value when called")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function without a signature: it will tell at call time
    try:
        signature.bind(*parameters)
    except TypeError:
        wanted = ", ".join(parameters)
        raise CallableError(f"{name}{signature} must take ({wanted}): it is called as {name}({wanted})") from None


def _import_name(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name) and name.split(".")[0] == e.name.split(".")[0]:
            raise CallableError(
                f"no module {name!r}: {name.replace('.', '/')}.py is not beside the file that names it (the working "
                "directory for --set) and no installed package has it"
            ) from None
        raise CallableError(f"importing {name!r} failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # the user's module failed while importing: say how, not where in our code
        raise CallableError(f"importing {name!r} failed: {type(e).__name__}: {e}") from None
    except SystemExit as e:  # sys.exit() at import would end `validate` with its code and no word
        raise CallableError(f"importing {name!r} failed: it called sys.exit({e.code!r}) while being imported") from None


def _import_file(path: Path) -> Any:
    """Import a .py file (or a package's __init__.py) under its dotted name from the folder above its packages.

    The folder goes on sys.path first while importing, so that the module's own imports of its
    siblings work. When another file of the same name was imported earlier in this process (two
    experiments' `metrics.py`), this one is loaded on its own, without replacing that one.
    """
    if not path.is_file():
        raise CallableError(f"{path}: no such file")
    parts = [path.parent.name] if path.name == "__init__.py" else [path.stem]
    root = path.parent.parent if path.name == "__init__.py" else path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    name = ".".join(parts)
    loaded = sys.modules.get(name)
    same = loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve()
    if same:
        return loaded
    sys.path.insert(0, str(root))
    try:
        return _import_name(name) if loaded is None else _exec_file(name, path)
    finally:
        sys.path.remove(str(root))


def _exec_file(name: str, path: Path) -> Any:
    """A module object for `path`, executed but not registered in sys.modules (its name is taken)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise CallableError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    except SystemExit as e:
        raise CallableError(f"importing {path} failed: it called sys.exit({e.code!r}) while being imported") from None
    return module
