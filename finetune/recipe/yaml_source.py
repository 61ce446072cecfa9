"""YAML with a location for every key, and without YAML's traps.

PyYAML silently keeps the last of two duplicate keys, reads `2e-5` as a string and `no`
as a boolean. Recipes live in git and are edited by hand, so we compose the node tree and
build plain Python values ourselves: every mapping key and sequence item keeps its file,
line and column; duplicates are errors; numbers follow YAML 1.2's core schema (`42`, `0x2A`,
`0o52`, `2e-5`, `.inf`); the YAML 1.1 booleans (`yes`/`no`/`on`/`off`) stay `Ambiguous` until
the schema says whether a bool is wanted. What a hand-written recipe never needs and a hostile
one abuses is refused with its line: aliases that copy more than MAX_ALIAS_COPIES values (an
"alias bomb" expands exponentially), nesting deeper than MAX_DEPTH, lone surrogates (`"\\ud800"`:
text no file or tokenizer can encode), integers over Python's 4,300 digits.
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
_INT_BASES = {"0o": (re.compile(r"0o[0-7]+"), 8), "0x": (re.compile(r"0x[0-9a-fA-F]+"), 16)}  # YAML 1.2 core
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}
MAX_DEPTH = 100  # sections and lists inside each other; a recipe uses about 5
MAX_ALIAS_COPIES = 10_000  # values that aliases (`*name`) may copy in one document
SURROGATE = re.compile(r"[\ud800-\udfff]")


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
    built: set[int] = field(default_factory=set, repr=False)  # ids of the nodes built so far
    copies: int = 0  # values built again through aliases
    unreadable: set[str] = field(default_factory=set)  # dotted keys whose value was refused here (no schema noise)


class _PlainLoader(yaml.SafeLoader):
    """Leaves every untagged plain scalar tagged `!plain`, so we resolve it by YAML 1.2 rules;
    refuses deep nesting while composing, before it can exhaust the stack."""

    yaml_implicit_resolvers: ClassVar[dict] = {}
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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
    except UnicodeDecodeError as e:
        raw = e.object
        line, col = raw[: e.start].count(b"\n") + 1, e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        message = f"not a UTF-8 text file: byte 0x{raw[e.start]:02x} (Latin-1 or another encoding?); save it as UTF-8"
        return Document(None, problems=[Problem(message, where=str(Loc(name, line, col)))])
    return parse(text, name)


def parse(text: str, name: str) -> Document:
    """Parse YAML text named `name` (a file name, or `--set key` for overrides)."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_PlainLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = Loc(name, mark.line + 1, mark.column + 1) if mark else Loc(name)
        reason = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.reader.ReaderError):  # a control character such as NUL: located by its position
            before = text[: e.position]
            where = Loc(name, before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
            reason = f"character {e.character:#06x} is not allowed in YAML (a binary file, or a stray NUL?)"
        return Document(None, problems=[Problem(f"invalid YAML: {reason}", where=str(where))])
    if len(nodes) > 1:
        where = _loc(nodes[1], name)
        problem = Problem("expected one YAML document, found a second one (after ---) here", where=str(where))
        return Document(None, problems=[problem])
    doc = Document(None)
    if nodes and nodes[0] is not None:
        try:
            doc.data = _build(nodes[0], (), name, doc)
        except _TooLarge as e:
            return Document(None, problems=[Problem(str(e), str(_loc(e.node, name)), _dotted(e.path[:2]))])
    return doc


class _TooLarge(ValueError):
    """Aliases that expand beyond MAX_ALIAS_COPIES, or a recursive alias: stops building at `node`."""

    def __init__(self, message: str, node: yaml.Node, path: KeyPath):
        super().__init__(message)
        self.node, self.path = node, path


def _loc(node: yaml.Node, name: str) -> Loc:
    return Loc(name, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(node: yaml.Node, path: KeyPath, name: str, doc: Document) -> Any:
    if id(node) in doc.built:  # reached again through an alias: a copy
        doc.copies += 1
        if doc.copies > MAX_ALIAS_COPIES or len(path) > MAX_DEPTH:
            raise _TooLarge(f"YAML aliases here copy more than {MAX_ALIAS_COPIES:,} values, or refer to "
                            "themselves: write the values out", node, path)  # fmt: skip
    doc.built.add(id(node))
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
        if not isinstance(key, str) or not key or SURROGATE.search(key):
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
    if SURROGATE.search(text):
        doc.problems.append(Problem(_SURROGATE_MESSAGE, str(_loc(node, name)), _dotted(path)))
        doc.unreadable.add(_dotted(path))
        return text
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
    if _INT.fullmatch(text) or (text[:2] in _INT_BASES and _INT_BASES[text[:2]][0].fullmatch(text)):
        return _int(text, node, name, doc, path)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text.lower()]
    return text


_SURROGATE_MESSAGE = "holds a lone surrogate escape (such as \\ud800): not text any file or tokenizer can encode"


def _int(text: str, node: yaml.ScalarNode, name: str, doc: Document, path: KeyPath) -> int | str:
    """A YAML 1.2 integer (decimal, 0o octal, 0x hex); one too long for Python (4,300 digits) is a problem."""
    try:
        return _int_value(text)
    except ValueError:
        doc.problems.append(
            Problem(f"a number of {len(text)} digits is too large", str(_loc(node, name)), _dotted(path))
        )
        doc.unreadable.add(_dotted(path))
        return text


def _int_value(text: str) -> int:
    base = _INT_BASES[text[:2]][1] if text[:2] in _INT_BASES else 10
    return int(text[2:] if base != 10 else text, base)


def _tagged(node: yaml.ScalarNode, name: str, doc: Document, path: KeyPath) -> Any:
    """Explicit `!!str`, `!!int`, `!!float`, `!!bool`; anything else is refused."""
    casts = {"str": str, "int": _int_value, "float": float, "bool": lambda t: _BOOLS[t]}
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
        or any(pattern.fullmatch(text) for pattern, _ in _INT_BASES.values())
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
