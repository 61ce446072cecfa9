"""The recipe reference (docs/reference/recipe.md), generated from the schema so that it can never disagree with it."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune.recipe.schema import Recipe


def markdown() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from `finetune/recipe/schema.py` by `finetune schema --markdown`; do not edit by hand.",
        "Every key is checked: an unknown key, a wrong type or an out-of-range value is an error with its file and line.",
        "Numbers are YAML 1.2's: integers `42`, `-3`, `0x2A`, `0o52`; floats `2e-4`, `0.5`, `.5`; a float field takes "
        "an integer too. Every number must be finite: `.inf` and `.nan` are refused.",
        "",
    ]
    for title, model in _sections(Recipe, ""):
        lines += [
            f"## `{title}`" if title else "## Top level",
            "",
            "| key | type | default | description |",
            "|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            resumable = " May change on `--resume`." if (field.json_schema_extra or {}).get("resumable") else ""
            lines.append(
                f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''}{resumable} |"
            )
        lines.append("")
    return "\n".join(lines)


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            out += _sections(section, f"{prefix}.{name}" if prefix else name)
    return out


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section(arg)
        if found is not None:
            return found
    return None


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section" if annotation.__name__.endswith("Section") else "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, BaseModel):
        return "see below"
    return f"`{json.dumps(field.default)}`"
