"""Checks that `finetune train` would otherwise hit only after loading weights, or after training.

`finetune validate` and the start of `train` run them, before any run directory is claimed or any
weight is read, and without importing torch: a local base model directory has its config,
safetensors weights, tokenizer files and (for `data.chat_template: auto`) a chat template; every
`module:function` the recipe names imports and takes the arguments it will be called with.
Each problem names the recipe's file:line and what to do.
"""

from __future__ import annotations

import json
import typing
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune.errors import Problem, RecipeError
from finetune.recipe import callables
from finetune.recipe.schema import BUILTIN_TEMPLATES, CallableRef, Recipe
from finetune.recipe.yaml_source import dotted

# Any one of these lets transformers build the tokenizer (fast tokenizer file, sentencepiece, BPE/WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tokenizer.tiktoken")  # fmt: skip
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def preflight(recipe: Recipe) -> None:
    """Raise a `RecipeError` with every problem found; return quietly when the recipe is ready to train.

    A parent run (`model.from_run`) that does not exist yet is a warning only: CI may validate a
    pipeline's recipes before their parents are trained; `train` refuses it before loading anything.
    """
    for message in _warnings(recipe):
        warnings.warn(message, stacklevel=2)
    found = problems(recipe)
    if found:
        raise RecipeError(found)


def problems(recipe: Recipe) -> list[Problem]:
    return [*_model_directory(recipe), *_callables(recipe), *_json_schema(recipe)]


def _json_schema(recipe: Recipe) -> list[Problem]:
    """`eval.json_schema` is JSON and a valid schema (its existence the loader checked), located at its key."""
    path = recipe.eval.json_schema
    if path is None or not Path(path).is_file():
        return []
    try:
        read_json_schema(path)
    except ValueError as e:
        return [Problem(f"{path}: {e}", _where(recipe, ("eval", "json_schema")), "eval.json_schema")]
    return []


def read_json_schema(path: str | Path) -> dict[str, Any]:
    """The schema in a file, checked against its declared draft (`jsonschema`); ValueError says what is wrong."""
    import jsonschema

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read the schema file ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"the schema file is not JSON ({e})") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON Schema: {e.message}") from None
    return schema


def _warnings(recipe: Recipe) -> list[str]:
    parent = recipe.model.from_run
    if parent is None or Path(parent).is_dir():
        return []
    where = _where(recipe, ("model", "from_run"))
    return [f"{where} model.from_run: {parent} does not exist (yet): train that run before this one"]


def _where(recipe: Recipe, key: tuple[str | int, ...]) -> str:
    return recipe.source.where(key) if recipe.source else ""


def _model_directory(recipe: Recipe) -> list[Problem]:
    """A local base model: config, weights, tokenizer and chat template, as `finetune train` will read them."""
    if recipe.model.base is None:
        return []  # model.from_run: the parent run's base, checked when the run is continued
    base = Path(recipe.model.base)
    if not base.is_dir():
        return []  # a hub id: checked for form only (no network in validate)
    missing = []
    if not (base / "config.json").is_file():
        missing.append("config.json")
    if not any(base.glob("*.safetensors")):
        bins = sorted(p.name for p in base.glob("*.bin"))
        missing.append(
            "safetensors weights (*.safetensors)"
            + (f"; {bins[0]} is there, but only safetensors are loaded" if bins else "")
        )
    if not any((base / name).is_file() for name in TOKENIZER_FILES) and not any(base.glob("*.tiktoken")):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    where = _where(recipe, ("model", "base"))
    found = []
    if missing:
        found.append(Problem(f"{base} has no {'; no '.join(missing)}", where, "model.base"))
    elif recipe.data.chat_template == "auto" and not _has_chat_template(base):
        found.append(
            Problem(
                f"the tokenizer in {base} has no chat template of its own (no {' or '.join(TEMPLATE_FILES)}, no "
                f"chat_template in tokenizer_config.json): set one of {', '.join(BUILTIN_TEMPLATES)} or a .jinja file",
                _where(recipe, ("data", "chat_template")),
                "data.chat_template",
            )
        )
    return found


def _has_chat_template(directory: Path) -> bool:
    if any((directory / name).is_file() for name in TEMPLATE_FILES):
        return True
    config = directory / "tokenizer_config.json"
    try:
        data: Any = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return True  # unreadable: transformers will say so with the file named
    return bool(isinstance(data, dict) and data.get("chat_template"))


def _callables(recipe: Recipe) -> list[Problem]:
    """Every `module:function` the recipe names imports, exists and takes the arguments it will be given."""
    found = []
    for key, spec, marker in _callable_fields(recipe):
        try:
            callables.load(spec, marker.parameters)
        except callables.CallableError as e:
            found.append(Problem(f"{callables.short_name(spec)}: {e}", _where(recipe, key), dotted(key)))
    return found


def _callable_fields(section: BaseModel, key: tuple[str | int, ...] = ()) -> list[tuple[tuple, str, CallableRef]]:
    """(key path, spec, marker) of every `module:function` value in the recipe's CallableRef fields."""
    out = []
    for name, field in type(section).model_fields.items():
        value, path = getattr(section, name), (*key, name)
        if isinstance(value, BaseModel):
            out += _callable_fields(value, path)
        elif isinstance(value, str) and ":" in value and (marker := _marker(field.metadata)):
            out.append((path, value, marker))
        elif isinstance(value, list) and (marker := _marker(_item_metadata(field.annotation))):
            out += [((*path, i), v, marker) for i, v in enumerate(value) if isinstance(v, str) and ":" in v]
    return out


def _marker(metadata: list[Any]) -> CallableRef | None:
    return next((m for m in metadata if isinstance(m, CallableRef)), None)


def _item_metadata(annotation: Any) -> list[Any]:
    """The Annotated metadata of a list field's items (`list[Annotated[str, CallableRef(...)]]`)."""
    for t in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(t) is list:
            (item,) = typing.get_args(t)
            return list(getattr(item, "__metadata__", ()))
    return []
