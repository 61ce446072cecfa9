"""Load a recipe: YAML file(s) -> `extends` merged -> `--set` applied -> paths resolved -> `Recipe`.

Every problem found on the way is collected with the file, line and key it came from, and
raised at once as a `RecipeError`: a user fixes a recipe in one pass, not one error per run.
"""

from __future__ import annotations

import difflib
import glob
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from finetune.errors import Problem, RecipeError
from finetune.recipe import callables
from finetune.recipe.schema import BUILTIN_TEMPLATES, CallableRef, FieldRuleError, PathRef, Recipe, RecipeSource
from finetune.recipe.yaml_source import (
    SURROGATE,
    Ambiguous,
    Document,
    KeyPath,
    Loc,
    display_path,
    dotted,
    load_file,
    parse,
)

SET_ORIGIN = "--set"
DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt"}
SHOWN_CHARS = 80  # of a bad value, in a message
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Recipe:
    """Validate the recipe at `path` with `--set key.path=value` overrides applied; raise `RecipeError`."""
    loader = _Loader()
    data, locs = loader.load(Path(path), ())
    data = data if isinstance(data, dict) else {}
    locs[()] = Loc(display_path(Path(path).expanduser().resolve()))  # a missing top-level key: the recipe given
    for override in overrides:
        loader.apply_override(data, locs, override)
    if loader.fatal:  # a file or an extends chain is unusable: schema errors would only be noise
        raise RecipeError(loader.problems)
    _Prepass(locs, loader.dirs, check_files, loader.problems).walk(Recipe, data, ())
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        loader.problems.extend(p for p in located_problems(e, data, locs, Recipe) if p.key not in loader.unreadable)
    if loader.problems:
        raise RecipeError(sorted(loader.problems, key=_problem_order))
    recipe._source = RecipeSource(Path(path), tuple(overrides), {k: str(v) for k, v in locs.items()})
    return recipe


class _Loader:
    """Reads files and their `extends` chains, keeping each value's location."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.fatal = False  # some file could not be used at all, so its keys are missing
        self.dirs: dict[str, Path] = {SET_ORIGIN: Path.cwd()}
        self.unreadable: set[str] = set()  # keys the YAML source refused the value of: no schema error repeats it

    def load(self, path: Path, chain: tuple[Path, ...]) -> tuple[Any, dict[KeyPath, Loc]]:
        path = path.expanduser().resolve()
        doc = load_file(path)
        self.dirs[display_path(path)] = path.parent
        self.problems.extend(doc.problems)
        self.unreadable |= doc.unreadable
        if doc.data is None:
            if doc.problems:
                self.fatal = True
            elif not chain:
                self.fatal = True
                self.problems.append(
                    Problem("the recipe is empty: expected keys such as name:, model:, data:", display_path(path))
                )
            return {}, {}
        if not isinstance(doc.data, dict):
            self.fatal = True
            self.problems.append(Problem("a recipe must be a mapping of keys (name:, model:, ...)", display_path(path)))
            return {}, {}
        merged: dict[str, Any] = {}
        merged_locs: dict[KeyPath, Loc] = {}
        for base in self._bases(doc, path, (*chain, path)):
            base_data, base_locs = self.load(base, (*chain, path))
            merged, merged_locs = _merge(merged, merged_locs, base_data, base_locs)
        return _merge(merged, merged_locs, doc.data, doc.locs)

    def _bases(self, doc: Document, path: Path, chain: tuple[Path, ...]) -> list[Path]:
        """The files named by `extends`, checked for form, existence and cycles; removes the key."""
        raw = doc.data.pop("extends", None)
        where = str(doc.locs.get(("extends",), Loc(display_path(path))))
        names = [raw] if isinstance(raw, str) else raw
        if raw is None:
            return []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            self.fatal = True
            self.problems.append(Problem("must be a file path or a list of file paths", where, "extends"))
            return []
        bases = []
        for name in names:
            base = (path.parent / name).expanduser().resolve()
            if base in chain:
                self.fatal = True
                cycle = " -> ".join(display_path(p) for p in (*chain[chain.index(base) :], base))
                self.problems.append(Problem(f"extends cycle: {cycle}", where, "extends"))
            elif not base.is_file():
                self.fatal = True
                shown = display_path(base)
                looked = f" (looked at {shown})" if shown != name else ""
                self.problems.append(Problem(f"file not found: {name}{looked}", where, "extends"))
            else:
                bases.append(base)
        return bases

    def apply_override(self, data: dict, locs: dict[KeyPath, Loc], override: str) -> None:
        """Apply `key.path=value`; the value is YAML (`16`, `2e-4`, `[q_proj, v_proj]`, `null`)."""
        key, sep, text = override.partition("=")
        parts: KeyPath = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
        if not sep or not key.strip() or any(p == "" for p in parts):
            self.problems.append(Problem(f"expected key.path=value, got {override!r}", SET_ORIGIN))
            return
        if SURROGATE.search(key):
            self.problems.append(Problem("the key holds bytes that are not UTF-8 text", SET_ORIGIN))
            return
        if parts[0] == "extends":
            self.problems.append(Problem("cannot be set with --set: write it in the recipe file", SET_ORIGIN, key))
            return
        doc = parse(text, SET_ORIGIN)
        # the value's YAML problems belong to this override: `--set lora.rank`, not `--set:1:3`
        self.problems.extend(Problem(p.message, SET_ORIGIN, f"{key}.{p.key}" if p.key else key) for p in doc.problems)
        self.unreadable |= {f"{key}.{k}" if k else key for k in doc.unreadable}
        if doc.data is None and doc.problems:
            return  # not YAML: the override is reported and left out
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and (not isinstance(part, int) or part >= len(node)):
                where = dotted(parts[:i])
                self.problems.append(Problem(f"no item {part} in {where} (it has {len(node)})", SET_ORIGIN, key))
                return
            child = _get(node, part)
            if child is None and isinstance(part, str) and isinstance(node, dict):
                child = node[part] = {}
                locs[parts[: i + 1]] = Loc(SET_ORIGIN)  # a section made by --set is located there
            if not isinstance(child, dict | list):
                self.problems.append(
                    Problem(f"cannot set inside {dotted(parts[: i + 1])!r}: it is not a section", SET_ORIGIN, key)
                )
                return
            node = child
        last = parts[-1]
        if isinstance(node, list) and (not isinstance(last, int) or last >= len(node)):
            where = dotted(parts[:-1])
            self.problems.append(Problem(f"no item {last} in {where} (it has {len(node)})", SET_ORIGIN, key))
            return
        node[last] = doc.data
        for path in [p for p in locs if p[: len(parts)] == parts]:
            del locs[path]
        locs[parts] = Loc(SET_ORIGIN)
        locs.update({(*parts, *sub): Loc(SET_ORIGIN) for sub in doc.locs})


def _get(node: Any, part: str | int) -> Any:
    if isinstance(node, dict) and isinstance(part, str):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _merge(base: dict, base_locs: dict, over: dict, over_locs: dict) -> tuple[dict, dict]:
    """Deep-merge mappings, `over` winning; lists and scalars replace. Locations follow the winner."""

    def merge(b: Any, o: Any) -> Any:
        if isinstance(b, dict) and isinstance(o, dict):
            return {**b, **{k: merge(b[k], v) if k in b else v for k, v in o.items()}}
        return o

    merged = merge(base, over)
    locs: dict[KeyPath, Loc] = {}

    def walk(node: Any, path: KeyPath) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            p = (*path, k)
            if p in over_locs or p in base_locs:
                locs[p] = over_locs.get(p) or base_locs[p]
            walk(v, p)

    walk(merged, ())
    return merged, locs


# --- schema-aware pre-pass: YAML 1.1 booleans and relative paths ---------------------------


class _Prepass:
    """Walks the raw data alongside the schema before validation.

    Resolves `Ambiguous` YAML 1.1 booleans (a bool where a bool is expected, an error
    elsewhere) and makes paths absolute against the file that set them, checking they exist.
    """

    def __init__(self, locs: dict[KeyPath, Loc], dirs: dict[str, Path], check_files: bool, problems: list[Problem]):
        self.locs, self.dirs, self.check_files, self.problems = locs, dirs, check_files, problems

    def walk(self, model: type[BaseModel], data: dict, path: KeyPath) -> None:
        for key, value in list(data.items()):
            field = model.model_fields.get(key)
            if field is not None:
                data[key] = self._value(field.annotation, field.metadata, value, (*path, key))

    def _value(self, annotation: Any, metadata: list, value: Any, path: KeyPath) -> Any:
        types_, markers = _flatten(annotation, metadata)
        if isinstance(value, str) and SURROGATE.search(value):
            return value  # already reported where it was written; no path or module can be looked up by it
        if isinstance(value, Ambiguous):
            if bool in types_:
                return value.as_bool()
            self._problem(path, f"unquoted {value!r} is a YAML 1.1 boolean; quote it ('{value}') if you mean the text")
            return value
        if isinstance(value, dict):
            for t in types_:
                if isinstance(t, type) and issubclass(t, BaseModel):
                    self.walk(t, value, path)
                    break
                if typing.get_origin(t) is dict:
                    _, item = typing.get_args(t)
                    return {k: self._value(item, [], v, (*path, k)) for k, v in value.items()}
        elif isinstance(value, list):
            for t in types_:
                if typing.get_origin(t) is list:
                    (item,) = typing.get_args(t)
                    return [self._value(item, [], v, (*path, i)) for i, v in enumerate(value)]
        elif isinstance(value, str) and markers and isinstance(markers[0], CallableRef):
            return callables.locate(value, self._base_dir(path)) if ":" in value else value
        elif isinstance(value, str) and value and markers:  # "" is left for the schema to refuse
            return self._resolve(markers[0].kind, value, path)
        return value

    def _base_dir(self, path: KeyPath) -> Path:
        """The folder of the file that set `path` (the working directory for --set)."""
        return self.dirs.get(self.locs.get(path, Loc(SET_ORIGIN)).file, Path.cwd())

    def _resolve(self, kind: str, value: str, path: KeyPath) -> str:
        candidate = (self._base_dir(path) / value).expanduser()
        if kind == "template" and (value == "auto" or value in BUILTIN_TEMPLATES):
            return value
        if kind == "local_or_hub" and not _looks_local(value, candidate):
            if not HUB_ID.fullmatch(value):
                self._problem(path, f"{value!r} is neither an existing local path nor a hub id (org/name)")
            return value
        if kind == "template" and "/" not in value and not value.endswith(".jinja"):
            hint = difflib.get_close_matches(value, BUILTIN_TEMPLATES, n=1)
            self._problem(
                path,
                f"unknown template {value!r}: use auto, {', '.join(BUILTIN_TEMPLATES)} or a .jinja file"
                + (f"; did you mean {hint[0]!r}?" if hint else ""),
            )
            return value
        resolved = candidate.resolve()
        if self.check_files and kind != "local" and not (resolved.exists() or glob.glob(str(resolved))):
            shown = display_path(resolved)
            self._problem(path, f"file not found: {value}" + (f" (looked at {shown})" if shown != value else ""))
        return str(resolved)

    def _problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(Problem(message, str(_nearest_loc(self.locs, path)), dotted(path)))


def is_local(value: str) -> bool:
    """Whether a loaded recipe's model or data value names a local path: loading made every local path absolute
    (`_looks_local` decided which are), so anything else is a hub id."""
    return Path(value).is_absolute()


def _looks_local(value: str, candidate: Path) -> bool:
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.count("/") >= 2
        or any(c in value for c in "*?[")
        or Path(value).suffix.lower() in DATA_SUFFIXES
        or candidate.exists()
    )


def _flatten(annotation: Any, metadata: list) -> tuple[list[Any], list[PathRef | CallableRef]]:
    """The concrete types inside Annotated/Union wrappers, and the PathRef/CallableRef markers on them."""
    types_: list[Any] = []
    markers = [m for m in metadata if isinstance(m, PathRef | CallableRef)]
    stack = [annotation]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is typing.Annotated:
            stack.append(typing.get_args(t)[0])
            markers += [m for m in t.__metadata__ if isinstance(m, PathRef | CallableRef)]
        elif origin in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(t))
        else:
            types_.append(t)
    return types_, markers


def _model_at(path: KeyPath, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    """The schema section a key path points into, for did-you-mean suggestions.

    A field may hold a section either directly or as list items (`data.eval` is `{split_ratio}`
    or a list of sources): the next part of the path, an index or a key, says which.
    """
    model: type[BaseModel] | None = root
    for i, part in enumerate(path):
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        in_list = i + 1 < len(path) and isinstance(path[i + 1], int)
        sections = _sections_in(field.annotation)
        model = next((m for m, listed in sections if listed == in_list), None)
    return model


def _sections_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """Every section model inside an annotation, each with whether it sits inside a list."""
    found: list[tuple[type[BaseModel], bool]] = []
    stack = [(annotation, False)]
    while stack:
        t, listed = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append((t, listed))
            continue
        stack.extend((arg, listed or typing.get_origin(t) is list) for arg in typing.get_args(t))
    return found


# --- pydantic errors -> located, readable problems -------------------------------------------


def located_problems(
    error: ValidationError, data: dict, locs: dict[KeyPath, Loc], root: type[BaseModel]
) -> list[Problem]:
    """Every pydantic error of validating `data` as `root`, located at the file:line that set it."""
    return [_problem(err, data, locs, root) for err in error.errors()]


def _problem(err: dict, data: dict, locs: dict[KeyPath, Loc], root: type[BaseModel]) -> Problem:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    path = _data_path(err["loc"], data, missing=kind == "missing")
    if kind == "value_error" and isinstance(ctx.get("error"), FieldRuleError):
        path = (*path, *_parse_dotted(ctx["error"].field))
    where = _nearest_loc(locs, path)
    return Problem(_message(kind, ctx, value, err["msg"], path, root), str(where), dotted(path))


def _data_path(loc: tuple, data: Any, missing: bool) -> KeyPath:
    """Drop the union tags pydantic puts in `loc` so that it matches the data's key path.

    Only a `missing` error ends in a key absent from the data; otherwise a last part that is
    not in the data is a tag too (`lora.targets` given as a mapping fails at tag "one").
    """
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            node = node[part]
        elif missing and i == len(loc) - 1 and isinstance(node, dict):
            pass  # the missing key
        else:
            continue  # a tag such as "list" or "one"
        path.append(part)
    return tuple(path)


def _parse_dotted(field: str) -> KeyPath:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", field) if p)


def _nearest_loc(locs: dict[KeyPath, Loc], path: KeyPath) -> Loc:
    """Where `path` was set, else where its nearest parent was; `()` is the recipe file itself."""
    for n in range(len(path), -1, -1):
        if path[:n] in locs:
            return locs[path[:n]]
    return Loc(SET_ORIGIN)


def _message(kind: str, ctx: dict, value: Any, msg: str, path: KeyPath, root: type[BaseModel]) -> str:
    got = f" (got {_show(value)})"
    if kind == "extra_forbidden":
        return _unknown_key(path, root)
    if kind == "missing":
        model = _model_at(path[:-1], root)
        field = model.model_fields.get(str(path[-1])) if model else None
        return "required" + (f": {field.description}" if field and field.description else "")
    bounds = {
        "greater_than_equal": "≥ {ge}",
        "greater_than": "> {gt}",
        "less_than": "< {lt}",
        "less_than_equal": "≤ {le}",
    }
    if kind in bounds:
        return "must be " + bounds[kind].format(**{k: _show_bound(v) for k, v in ctx.items()}) + got
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        if allowed == ["auto"]:  # a value that may also be `auto` (AutoBool, max_seq_length)
            model = _model_at(path[:-1], root)
            field = model.model_fields.get(str(path[-1])) if model else None
            kinds = {get_args(member)[0] for member in get_args(field.annotation)} if field else set()
            other = "true, false" if bool in kinds else "a whole number"
            return f"must be {other} or auto{got}"
        hint = difflib.get_close_matches(str(value), allowed, n=1) if isinstance(value, str) else []
        listed = f", or a list such as [{value}]" if isinstance(value, str) and not hint and _takes_list(path) else ""
        return f"must be one of: {', '.join(allowed)}{listed}{got}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    if kind == "value_error":
        return str(ctx.get("error", msg)) if ctx.get("error") else msg.removeprefix("Value error, ")
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s){got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_unicode":
        return "holds a lone surrogate (such as \\ud800): not text any file or tokenizer can encode"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters (got {len(value)})"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')} (letters, digits, '.', '_', '-'){got}"
    plain = {
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "list_type": "must be a list",
        "dict_type": "must be a mapping of keys",
        "model_type": "must be a mapping of keys",
        "model_attributes_type": "must be a mapping of keys",
        "union_tag_invalid": "has the wrong type",
        "finite_number": "must be a finite number",
    }
    return plain.get(kind, msg) + got


def _takes_list(path: KeyPath) -> bool:
    """Whether the field at `path` also accepts a list (`lora.targets`: a preset or a list of names)."""
    model = _model_at(path[:-1])
    field = model.model_fields.get(str(path[-1])) if model and path else None
    return field is not None and any(typing.get_origin(t) is list for t in _flatten(field.annotation, [])[0])


def _unknown_key(path: KeyPath, root: type[BaseModel]) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1], root)
    allowed = list(model.model_fields) if model else []
    elsewhere = [dotted(p) for p in _all_field_paths(root, ()) if p[-1] == key]
    if elsewhere:  # an exact name in another section beats a near miss here (`lr` is not `lora`)
        return f"unknown key here; it belongs at {' or '.join(elsewhere)}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; allowed: {', '.join(allowed)}"


def _all_field_paths(model: type[BaseModel], prefix: KeyPath) -> list[KeyPath]:
    out = []
    for name, field in model.model_fields.items():
        out.append((*prefix, name))
        for section, _ in _sections_in(field.annotation):
            out += [p for p in _all_field_paths(section, (*prefix, name)) if p not in out]
    return out


def _show_bound(value: Any) -> str:
    """A schema bound: `> 0`, not `> 0.0`."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else _show(value)


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) > SHOWN_CHARS:  # a 2 MB value is named, not printed
        return f"{value[:SHOWN_CHARS]!r}... ({len(value):,} characters)"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return type(value).__name__


def _problem_order(p: Problem) -> tuple:
    file, _, rest = p.where.partition(":")
    line = int(rest.split(":")[0]) if rest.split(":")[0].isdigit() else 0
    return (file == SET_ORIGIN, file, line)
