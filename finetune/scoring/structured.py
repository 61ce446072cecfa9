"""Structured-output metrics whose rule comes from the recipe: a JSON Schema file (`eval.json_schema`) and a
pattern (`eval.regex`). Each is an ordinary metric(prediction, reference) -> float once built, so slices,
intervals and the gate treat them as any other."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import Problem, UserError
from finetune.recipe.preflight import read_json_schema


def json_schema_metric(path: str | Path) -> Callable[[str, str], float]:
    """1.0 for an answer that parses as JSON and is valid against the schema file, else 0.0.

    The schema is checked first (JSON, and valid for its declared draft), so a broken schema file stops the
    evaluation naming the file instead of scoring every answer 0.
    """
    import jsonschema

    try:
        schema = read_json_schema(path)
    except ValueError as e:
        raise UserError(Problem(f"eval.json_schema: {e}", str(path))) from None
    validator = jsonschema.validators.validator_for(schema)(schema)

    def json_schema(prediction: str, reference: str) -> float:
        try:
            value: Any = json.loads(prediction)
        except ValueError:
            return 0.0
        return float(validator.is_valid(value))

    return json_schema


def regex_metric(pattern: str) -> Callable[[str, str], float]:
    """1.0 for an answer that the recipe's pattern matches whole (stripped), else 0.0; the reference is unused."""
    compiled = re.compile(pattern, flags=re.DOTALL)

    def regex(prediction: str, reference: str) -> float:
        return float(compiled.fullmatch(prediction.strip()) is not None)

    return regex
