"""Mutations of a valid recipe and of valid data rows, each with what must come of it.

Shared by `recipe/test_fuzz.py` (Hypothesis, bounded for CI) and `scripts/fuzz_inputs.py` (the long run
whose figures are in docs/measurements/reliability.md). A mutation is driven by a `random.Random`, so Hypothesis can
generate and shrink it (`st.randoms()`) and a plain seed can replay it.

Which mutations must stay invalid is decided here, not guessed from the result:
- recipes: deleting a required key, giving a value of another type, misspelling a key (into a name the
  section does not have), moving a key into a section that does not have it, and writing a key twice
  must be refused, with the problem's key and line pointing at the mutated place; deleting an
  optional key may be fine; strange-but-valid YAML (BOM, CRLF, comments, `---`/`...`, JSON syntax,
  quoted keys, YAML 1.1 booleans where a bool is wanted, blank lines) must load to the same recipe.
- data rows: dropping a field, changing a value's type, an unknown role, cutting a line short, and
  inserting bytes that make the line non-UTF-8 or non-JSON must be refused naming the file and the
  line; other inserted bytes may leave the row valid. With `on_bad_row: skip`, every non-blank line is
  either a row or counted as skipped.
Any exception other than RecipeError / DataError is a failure (it would be a traceback or exit 1).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune.data.prepare import DataStats, load_samples
from finetune.errors import DataError, RecipeError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import DataSource, Recipe

VALID: dict[str, Any] = {
    "name": "demo",
    "seed": 3,
    "model": {"base": "./model", "dtype": "float32"},
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
    "data": {
        "train": [{"path": "data/train.jsonl", "format": "messages"}],
        "eval": [{"path": "data/eval.jsonl"}],
        "max_seq_length": 64,
        "on_bad_row": "error",
    },
    "train": {"epochs": 1, "lr": 0.001, "batch_size": 2, "grad_accum": 1, "save_every": 5, "eval_every": 5},
    "eval": {"metrics": ["loss"], "max_new_tokens": 16, "compare_base": True},
}
RECIPE = "recipe.yaml"
WRONG_VALUES = {  # values of another type than the field's, by the type of the valid value
    int: ["abc", [1], {"a": 1}, 1.5, True],
    float: ["abc", [0.1], {"a": 1}, True],
    str: [[1], {"a": 1}, 12, 1.5],
    bool: ["maybe", [True], 7],
    list: [12, {"a": 1}, 1.5],
}
RECIPE_MUTATIONS = ("delete", "retype", "misspell", "move", "duplicate", "strange")


def dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def emit(data: dict) -> tuple[str, dict[tuple, int]]:
    """Block YAML for `data`, with the line of every key path (scalars and flow values as JSON)."""
    lines: list[str] = []
    where: dict[tuple, int] = {}

    def walk(node: dict, indent: int, path: tuple) -> None:
        for key, value in node.items():
            where[(*path, key)] = len(lines) + 1
            pad = " " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                walk(value, indent + 2, (*path, key))
            elif isinstance(value, list) and value and all(isinstance(x, dict) and x for x in value):
                lines.append(f"{pad}{key}:")
                for i, item in enumerate(value):
                    for j, (k, v) in enumerate(item.items()):
                        where[(*path, key, i, k)] = len(lines) + 1
                        lines.append(f"{pad}  {'- ' if j == 0 else '  '}{k}: {json.dumps(v)}")
            else:
                lines.append(f"{pad}{key}: {json.dumps(value)}")

    walk(data, 0, ())
    return "\n".join(lines) + "\n", where


def leaves(data: Any, path: tuple = ()) -> list[tuple]:
    """Key paths of scalar and list-of-scalar values."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in leaves(v, (*path, k))]
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        return [p for i, v in enumerate(data) for p in leaves(v, (*path, i))]
    return [path]


def sections(data: dict, path: tuple = ()) -> list[tuple]:
    """Paths of the mappings in `data` (the root included)."""
    out = [path]
    for k, v in data.items():
        if isinstance(v, dict):
            out += sections(v, (*path, k))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out += [p for i, x in enumerate(v) for p in sections(x, (*path, k, i))]
    return out


def get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def fields_at(path: tuple) -> set[str] | None:
    """The field names the schema allows in the mapping at `path` (None when unknown)."""
    from finetune.recipe.schema import DataSection, DataSource, EvalSection, LoraSection, ModelSection, TrainSection

    named = {(): Recipe, ("model",): ModelSection, ("lora",): LoraSection, ("data",): DataSection,
             ("train",): TrainSection, ("eval",): EvalSection}  # fmt: skip
    model = named.get(path) or (DataSource if len(path) == 3 and path[:1] == ("data",) else None)
    return set(model.model_fields) if model else None


def field(path: tuple) -> Any:
    """The schema's FieldInfo for the key at `path` (None when unknown)."""
    parent = fields_at(path[:-1])
    if parent is None:
        return None
    from finetune.recipe.schema import DataSection, DataSource, EvalSection, LoraSection, ModelSection, TrainSection

    for model in (Recipe, ModelSection, LoraSection, DataSection, DataSource, TrainSection, EvalSection):
        if set(model.model_fields) == parent:
            return model.model_fields.get(path[-1])
    return None


def required(path: tuple) -> bool:
    info = field(path)
    return bool(info and info.is_required())


def schema_type(path: tuple, value: Any) -> type:
    """float for a number field that takes fractions (alpha: 16 is a float field), else the value's type."""
    info = field(path)
    return float if isinstance(value, int) and info is not None and "float" in str(info.annotation) else type(value)


@dataclass
class RecipeCase:
    mutation: str
    text: bytes
    must_fail: bool | None  # None: either outcome is right
    key: str = ""  # the problem's key must be this (or inside it)
    line: int | None = None  # ... and its line this one
    note: str = ""


def mutate_recipe(rng: random.Random) -> RecipeCase:
    data = copy.deepcopy(VALID)
    mutation = rng.choice(RECIPE_MUTATIONS)
    if mutation == "delete":
        path = rng.choice([p for p in leaves(data) + sections(data) if p])
        parent = get(data, path[:-1])
        del parent[path[-1]]
        text, _ = emit(data)
        return RecipeCase(mutation, text.encode(), True if required(path) else None, dotted(path), None, dotted(path))
    if mutation == "retype":
        path = rng.choice(leaves(data))
        value = get(data, path)
        wrong = rng.choice(WRONG_VALUES[schema_type(path, value)])
        if path[-1] == "targets" and isinstance(wrong, str):
            wrong = 12
        get(data, path[:-1])[path[-1]] = wrong
        text, where = emit(data)
        return RecipeCase(mutation, text.encode(), True, dotted(path), where[path], f"{dotted(path)}={wrong!r}")
    if mutation in ("misspell", "move"):
        path = rng.choice(leaves(data))
        parent_path, key = path[:-1], path[-1]
        if mutation == "misspell":
            target_path, new = parent_path, misspell(rng, key)
        else:
            target_path, new = rng.choice([s for s in sections(data) if s != parent_path]), key
        allowed = fields_at(target_path) or set()
        if new in allowed or new in get(data, target_path):
            return RecipeCase(mutation, emit(data)[0].encode(), False, note="collides with a real field: unchanged")
        value = get(data, parent_path).pop(key)
        get(data, target_path)[new] = value
        text, where = emit(data)
        moved = (*target_path, new)
        return RecipeCase(
            mutation, text.encode(), True, dotted(moved), where[moved], f"{dotted(path)} -> {dotted(moved)}"
        )
    if mutation == "duplicate":
        path = rng.choice(leaves(data))
        text, where = emit(data)
        lines = text.splitlines(keepends=True)
        line = lines[where[path] - 1]
        if line.lstrip().startswith("- "):  # the first key of a list item: repeat it as a plain key
            line = line.replace("- ", "  ", 1)
        lines.insert(where[path], line)
        return RecipeCase(mutation, "".join(lines).encode(), True, dotted(path), where[path] + 1, dotted(path))
    return strange(rng, data)


# --- hostile values at every field of the schema ----------------------------------------------------
# Each is refused at the key and line it was written, whichever field it lands in; generated from the schema, so a
# field added to it is covered without anyone listing it. (YAML text, put in place of a JSON placeholder.)
HOSTILE_YAML = {
    "surrogate": ("any", '"x\\ud800y"', "lone surrogate"),
    "huge_integer": ("int", "9" * 5000, "5000 digits is too large"),
    "infinity": ("float", ".inf", "must be a finite number"),
    "nan": ("float", ".nan", "must be a finite number"),
    "deep_nesting": ("any", "[" * 200 + "]" * 200, "nested more than 100 levels deep"),
}


def schema_fields(model: Any = Recipe, prefix: tuple = ()) -> list[tuple[tuple, set[str]]]:
    """(key path, kinds) of every scalar or list field in the schema; kinds among int, float, text.

    A section inside a list (data.train) is entered at item 0; `extends` is left out (it names files to read).
    """
    from finetune.recipe.load import _flatten, _sections_in

    out: list[tuple[tuple, set[str]]] = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        if path == ("extends",):
            continue
        sections = _sections_in(info.annotation)
        for section, listed in sections:
            out += schema_fields(section, (*path, 0) if listed else path)
        types_, _ = _flatten(info.annotation, info.metadata)
        kinds = {"int" for t in types_ if t is int} | {"float" for t in types_ if t is float}
        if any(t is not type(None) and not (isinstance(t, type) and issubclass(t, BaseModel)) for t in types_):
            out.append((path, kinds | {"text", "any"}))
    return out


def hostile_recipes() -> list[RecipeCase]:
    """Every hostile value at every schema field that fits VALID's shape, plus an alias bomb before the recipe."""
    cases = []
    for path, kinds in schema_fields():
        for kind, (needs, text, phrase) in HOSTILE_YAML.items():
            data = copy.deepcopy(VALID)
            if needs not in kinds or not _set_path(data, path, "@HOSTILE@"):
                continue
            emitted, where = emit(data)
            raw = emitted.replace('"@HOSTILE@"', text)
            key = "" if kind == "deep_nesting" else dotted(path)
            cases.append(
                RecipeCase("hostile", raw.encode(), True, key, where[path], f"{kind} at {dotted(path)}|{phrase}")
            )
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    cases.append(RecipeCase("hostile", (bomb + emit(VALID)[0]).encode(), True, "", 1, "alias bomb|aliases here copy"))
    return cases


def _set_path(data: dict, path: tuple, value: Any) -> bool:
    """Set `path` in `data`, making sections on the way; False where VALID's shape differs (a list for a section)."""
    node: Any = data
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return False
            node = node[part]
            continue
        if not isinstance(node, dict):
            return False
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        return False
    node[path[-1]] = value
    return True


def check_hostile(case: RecipeCase, workspace: Path) -> str:
    """A hostile recipe is refused, fast, with a problem at its line (and key); never another exception."""
    import time

    (workspace / RECIPE).write_bytes(case.text)
    started = time.monotonic()
    try:
        load_recipe(RECIPE)
    except RecipeError as e:
        phrase = case.note.split("|")[1]
        hits = [p for p in e.problems if p.where.startswith(f"{RECIPE}:{case.line}:") and phrase in p.message
                and (not case.key or p.key == case.key)]  # fmt: skip
        assert hits, f"{case.note}: no problem at line {case.line} key {case.key!r}: {e}"
        assert time.monotonic() - started < 5, f"{case.note}: {time.monotonic() - started:.1f} s"
        return "refused"
    raise AssertionError(f"{case.note} was accepted")


def misspell(rng: random.Random, key: str) -> str:
    i = rng.randrange(len(key))
    edit = rng.choice(("drop", "swap", "double", "case", "replace"))
    if edit == "drop" and len(key) > 1:
        return key[:i] + key[i + 1 :]
    if edit == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if edit == "case":
        return key[:i] + key[i].swapcase() + key[i + 1 :]
    if edit == "replace":
        return key[:i] + rng.choice("aeioustrn_") + key[i + 1 :]
    return key[:i] + key[i] + key[i:]


def strange(rng: random.Random, data: dict) -> RecipeCase:
    """The same recipe written in odd but valid YAML: it must load, and load the same."""
    text, _ = emit(data)
    chosen = rng.sample(
        ("comments", "json", "markers", "quoted_keys", "yes", "blank", "crlf", "bom"), rng.randint(1, 3)
    )
    if "json" in chosen:
        text = json.dumps(data, indent=rng.choice((None, 2))) + "\n"
    if "yes" in chosen and "json" not in chosen:
        text = text.replace("compare_base: true", f"compare_base: {rng.choice(('yes', 'on', 'True', 'TRUE'))}")
    if "quoted_keys" in chosen and "json" not in chosen:
        text = "\n".join(_quote_key(line) for line in text.splitlines()) + "\n"
    if "comments" in chosen:
        text = "".join(
            line + ("  # note: a comment" if rng.random() < 0.5 else "") + "\n" for line in text.splitlines()
        )
        text = "# a recipe\n" + text
    if "blank" in chosen:
        text = "".join(line + "\n" + ("\n" if rng.random() < 0.3 else "") for line in text.splitlines())
    if "markers" in chosen:
        text = "---\n" + text + "...\n"
    if "crlf" in chosen:
        text = text.replace("\n", "\r\n")
    raw = text.encode()
    if "bom" in chosen:
        raw = b"\xef\xbb\xbf" + raw
    return RecipeCase("strange", raw, False, note="+".join(sorted(chosen)))


def _quote_key(line: str) -> str:
    stripped = line.lstrip(" ")
    pad = line[: len(line) - len(stripped)]
    dash = "- " if stripped.startswith("- ") else ""
    body = stripped[len(dash) :]
    key, sep, rest = body.partition(":")
    return f'{pad}{dash}"{key}"{sep}{rest}' if sep and key and not key.startswith('"') else line


def check_recipe(case: RecipeCase, workspace: Path, baseline: Recipe) -> str:
    """Load the mutated recipe (cwd = workspace); return 'refused' or 'accepted'; raise AssertionError if wrong."""
    (workspace / RECIPE).write_bytes(case.text)
    try:
        recipe = load_recipe(RECIPE)
    except RecipeError as e:
        assert case.must_fail is not False, f"{case.mutation} ({case.note}) must load; got {e}"
        if case.must_fail and case.key:
            hits = [p for p in e.problems if p.key == case.key or p.key.startswith(case.key + ".")
                    or p.key.startswith(case.key + "[")]  # fmt: skip
            assert hits, f"{case.mutation} ({case.note}): no problem at {case.key}: {e}"
            if case.line is not None:
                lines = {p.where.split(":")[1] if p.where.count(":") >= 1 else "" for p in hits}
                assert str(case.line) in lines, f"{case.mutation} ({case.note}): not at line {case.line}: {e}"
        assert all(p.where.startswith(RECIPE) or p.where == "" for p in e.problems), str(e)
        return "refused"
    assert case.must_fail is not True, (
        f"{case.mutation} ({case.note}) was accepted:\n{case.text.decode(errors='replace')}"
    )
    if case.mutation == "strange":
        assert recipe.model_dump() == baseline.model_dump(), f"strange YAML ({case.note}) loaded differently"
    return "accepted"


# --- data rows ---------------------------------------------------------------------------------------

# One valid row of every data format, with its shape variants: what generated tests mutate field by field.
# `test_format_rows_cover_every_format` fails until a new format (recipe.FORMAT_FIELDS) has its rows here.
FORMAT_ROWS: dict[str, list[dict[str, Any]]] = {
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"},
                               {"role": "assistant", "content": "b a"}]}],
    "alpaca": [{"instruction": "Reverse", "input": "a b", "output": "b a", "system": "Be brief."}],
    "completion": [{"prompt": "Reverse: a b ->", "completion": " b a"}, {"text": "Reverse: a b -> b a"}],
    "preference": [
        {"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b"},
        {"chosen": [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}],
         "rejected": [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "a b"}]},
    ],
    "unpaired": [{"prompt": "Reverse: a b", "completion": "b a", "label": True}],
}  # fmt: skip


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # every file type a local source reads


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as the file type `path` ends in, the way other tools write them (CSV: every cell text)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: str(v).lower() if isinstance(v, bool) else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        from pyarrow import parquet

        parquet.write_table(pa.Table.from_pylist(rows), path)
    return path


def text_leaves(row: Any, path: tuple = ()) -> list[tuple]:
    """Key paths of every string in a row (contents, prompts, answers, roles)."""
    if isinstance(row, dict):
        return [p for k, v in row.items() for p in text_leaves(v, (*path, k))]
    if isinstance(row, list):
        return [p for i, v in enumerate(row) for p in text_leaves(v, (*path, i))]
    return [path] if isinstance(row, str) else []


def with_value(row: Any, path: tuple, value: Any) -> Any:
    """A deep copy of `row` with the value at `path` replaced."""
    row = copy.deepcopy(row)
    get(row, path[:-1])[path[-1]] = value
    return row


ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Reverse: a{i} b{i}"},
                  {"role": "assistant", "content": f"b{i} a{i}"}]}
    for i in range(4)
]  # fmt: skip
DATA_MUTATIONS = ("drop_field", "change_type", "unknown_role", "insert_bytes", "cut_line", "hostile")
# Valid JSON that is no row's text, in place of a turn's content (raw JSON text): each must be refused at its line.
HOSTILE_JSON = {
    "surrogate": '"a\\ud800b"',  # a lone surrogate escape: valid JSON, not text
    "huge_integer": "9" * 5000,  # beyond Python's 4,300-digit int limit
    "deep_nesting": "[" * 5000 + "]" * 5000,  # beyond the recursion limit
    "nan": "NaN",  # Python's json reads these; no text field takes them
    "infinity": "-Infinity",
}
WRONG_TYPES = [None, 0, 1.5, True, [], {}, [1], {"x": 1}, ["a"]]


@dataclass
class DataCase:
    mutation: str
    lines: list[bytes]
    line: int  # 1-based line that was mutated
    must_fail: bool | None
    note: str = ""


def mutate_rows(rng: random.Random) -> DataCase:
    rows = copy.deepcopy(ROWS)
    j = rng.randrange(len(rows))
    mutation = rng.choice(DATA_MUTATIONS)
    must_fail: bool | None = True
    note = ""
    if mutation == "hostile":
        kind = rng.choice(sorted(HOSTILE_JSON))
        turns = rows[j]["messages"]
        i = rng.randrange(len(turns))
        turns[i]["content"] = "@HOSTILE@"
        lines = [json.dumps(r).encode() for r in rows]
        lines[j] = lines[j].replace(b'"@HOSTILE@"', HOSTILE_JSON[kind].encode())
        return DataCase(mutation, lines, j + 1, True, f"{kind} as messages[{i}].content")
    if mutation in ("drop_field", "change_type", "unknown_role"):
        turns = rows[j]["messages"]
        i = rng.randrange(len(turns))
        if mutation == "drop_field":
            path = rng.choice([("messages",), ("messages", i, "role"), ("messages", i, "content")])
            del get(rows[j], path[:-1])[path[-1]]
        elif mutation == "change_type":
            path = rng.choice([("messages",), ("messages", i), ("messages", i, "role"), ("messages", i, "content")])
            get(rows[j], path[:-1])[path[-1]] = rng.choice(WRONG_TYPES)
        else:
            path = ("messages", i, "role")
            turns[i]["role"] = rng.choice(["human", "gpt", "bot", "model", "tool", "User", "", "assistant "])
        note = f"{mutation} {dotted(path)}"
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5).encode() for r in rows]
    else:
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
        raw = lines[j]
        if mutation == "cut_line":
            k = rng.randint(1, len(raw) - 1)
            lines[j], note = raw[:k], f"cut at byte {k} of {len(raw)}"
        else:
            k = rng.randint(0, len(raw))
            if rng.random() < 0.3:  # harmless where it lands between tokens or inside text
                junk = rng.choice([b" ", b"\t", "é".encode(), "\u2028".encode(), b"  "])
            else:
                junk = bytes(rng.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(rng.randint(1, 4)))
            mutated = raw[:k] + junk + raw[k:]
            lines[j], note = mutated, f"inserted {junk!r} at byte {k}"
            must_fail = True if not _decodes_as_json(mutated, first=j == 0) else None
    return DataCase(mutation, lines, j + 1, must_fail, note)


def _decodes_as_json(raw: bytes, first: bool) -> bool:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except ValueError:
        return False


def check_rows(case: DataCase, workspace: Path, ending: bytes = b"\n") -> str:
    """Read the mutated file as `finetune train` does (cwd = workspace); return 'refused' or 'accepted'."""
    name = "train.jsonl"
    (workspace / name).write_bytes(b"".join(line + ending for line in case.lines))
    source = DataSource(path=str(workspace / name))
    try:
        samples = load_samples([source], "error", DataStats())
    except DataError as e:
        assert case.must_fail is not False, f"{case.mutation} ({case.note}) must be read; got {e}"
        (problem,) = e.problems
        assert problem.where == f"{name}:{case.line}", f"{case.mutation} ({case.note}): {problem.where} {e}"
        outcome = "refused"
    else:
        assert case.must_fail is not True, f"{case.mutation} ({case.note}) was accepted: {case.lines[case.line - 1]!r}"
        assert len(samples) == len(case.lines)
        outcome = "accepted"
    stats = DataStats()
    kept = load_samples([source], "skip", stats)
    non_blank = sum(bool(line.strip()) for line in case.lines)
    assert len(kept) + stats.sources[0].skipped == non_blank, f"{case.mutation} ({case.note}): a row went uncounted"
    assert sum(stats.sources[0].skipped_by_reason.values()) == stats.sources[0].skipped
    return outcome
