"""YAML with a location for every key, and without YAML's traps.

PyYAML silently keeps the last of two duplicate keys, reads `2e-5` as a string and `no`
as a boolean. Recipes live in git and are edited by hand, so we compose the node tree and
build plain Python values ourselves: every mapping key and sequence item keeps its file,
line and column; duplicates are errors; numbers follow YAML 1.2; the YAML 1.1 booleans
(`yes`/`no`/`on`/`off`) stay `Ambiguous` until the schema says whether a bool is wanted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from finetune.errors import Problem

KeyPath = tuple[str | int, ...]

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


@dataclass(frozen=True)
class Loc:
    """Where a key or value was written: `file:line:col`, 1-based like editors show it."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file


class Ambiguous(str):
    """An unquoted YAML 1.1 boolean (`yes`, `no`, `on`, `off`): a bool only where a bool is expected."""

    def as_bool(self) -> bool:
        return self.lower() in {"yes", "on", "y"}


@dataclass
class Document:
    """Plain data plus the location of each key path (mapping keys and sequence items).

    `data` is None for an empty document, and for one that could not be read or parsed at all
    (then `problems` says why); otherwise problems such as duplicate keys leave the rest usable.
    """

    data: Any
    locs: dict[KeyPath, Loc] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class _PlainLoader(yaml.SafeLoader):
    """Leaves every untagged plain scalar tagged `!plain`, so we resolve it by YAML 1.2 rules."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


for _first in ("", None):
    _PlainLoader.add_implicit_resolver("!plain", re.compile(r".*", re.S), [_first] if _first == "" else None)


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_file(path: Path) -> Document:
    """Parse one YAML file; problems are collected, not raised."""
    name = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return Document(None, problems=[Problem(f"cannot read file: {e.strerror}", where=name)])
    except UnicodeDecodeError:
        return Document(None, problems=[Problem("not a UTF-8 text file", where=name)])
    return parse(text, name)


def parse(text: str, name: str) -> Document:
    """Parse YAML text named `name` (a file name, or `--set key` for overrides)."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_PlainLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = Loc(name, mark.line + 1, mark.column + 1) if mark else Loc(name)
        reason = getattr(e, "problem", None) or str(e)
        return Document(None, problems=[Problem(f"invalid YAML: {reason}", where=str(where))])
    if len(nodes) > 1:
        return Document(None, problems=[Problem("expected one YAML document, found several (---)", where=name)])
    doc = Document(None)
    if nodes and nodes[0] is not None:
        doc.data = _build(nodes[0], (), name, doc)
    return doc


def _loc(node: yaml.Node, name: str) -> Loc:
    return Loc(name, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(node: yaml.Node, path: KeyPath, name: str, doc: Document) -> Any:
    if isinstance(node, yaml.MappingNode):
        return _build_mapping(node, path, name, doc)
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            doc.locs[(*path, i)] = _loc(item, name)
            items.append(_build(item, (*path, i), name, doc))
        return items
    return _scalar(node, name, doc, path)


def _build_mapping(node: yaml.MappingNode, path: KeyPath, name: str, doc: Document) -> dict:
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        where = _loc(key_node, name)
        # our loader resolves no implicit tags, so a plain `<<` arrives untagged, not as a merge key
        if key_node.tag == "tag:yaml.org,2002:merge" or (
            isinstance(key_node, yaml.ScalarNode) and key_node.style is None and key_node.value == "<<"
        ):
            doc.problems.append(Problem("YAML merge keys (<<) are not supported: use `extends:`", str(where)))
            continue
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or not key:
            doc.problems.append(Problem("keys must be plain names", str(where)))
            continue
        if key in out:
            first = doc.locs[(*path, key)]
            doc.problems.append(
                Problem(
                    f"duplicate key (first set at line {first.line}); remove one", str(where), _dotted((*path, key))
                )
            )
            continue
        doc.locs[(*path, key)] = where
        out[key] = _build(value_node, (*path, key), name, doc)
    return out


def _scalar(node: yaml.ScalarNode, name: str, doc: Document, path: KeyPath) -> Any:
    text = node.value
    if node.tag == "tag:yaml.org,2002:str":  # quoted, block or `!!str`: always a string
        return text
    if node.tag != "!plain":  # an explicit tag, on a plain or a quoted scalar
        return _tagged(node, name, doc, path)
    if text in _NULLS:
        return None
    if text in _BOOLS:
        return _BOOLS[text]
    if text.lower() in _YAML11_BOOLS:
        return Ambiguous(text)
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text.lower()]
    return text


def _tagged(node: yaml.ScalarNode, name: str, doc: Document, path: KeyPath) -> Any:
    """Explicit `!!str`, `!!int`, `!!float`, `!!bool`; anything else is refused."""
    casts = {"str": str, "int": int, "float": float, "bool": lambda t: _BOOLS[t]}
    kind = node.tag.removeprefix("tag:yaml.org,2002:")
    try:
        return casts[kind](node.value)
    except (KeyError, ValueError):
        doc.problems.append(
            Problem(f"unsupported YAML tag or value: {node.tag} {node.value!r}", str(_loc(node, name)), _dotted(path))
        )
        return node.value


def _dotted(path: KeyPath) -> str:
    """`("data", "train", 0, "path")` -> `data.train[0].path`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


dotted = _dotted


def _reads_as_text(text: str) -> bool:
    """Whether a plain (unquoted) scalar with this text would load back as this very string."""
    lowered = text.lower()
    return not (
        text in _NULLS
        or text in _BOOLS
        or lowered in _YAML11_BOOLS
        or lowered in _SPECIAL_FLOATS
        or _INT.fullmatch(text)
        or _FLOAT.fullmatch(text)
    )


class _Dumper(yaml.SafeDumper):
    """Quotes every string our loader would otherwise read as a number, null or boolean (`1234e56`, `no`)."""


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style=None if _reads_as_text(value) else '"'
    ),
)


def dump(data: Any) -> str:
    """YAML text that `parse` reads back to exactly `data`."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
