"""`finetune validate` and `finetune schema`: the recipe on its own, without a model, a GPU or torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from finetune.cli.common import JsonOpt, SetOpt, handles_errors
from finetune.errors import UserError


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)


@handles_errors
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML file(s).", show_default=False)],
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    show: Annotated[bool, typer.Option("--print", help="Print the fully resolved recipe.")] = False,
) -> None:
    """Check recipes and sweep files (schema, extends, overrides, local files) without touching a model or GPU.

    Example: finetune validate recipes/*.yaml --set lora.rank=32
    """
    results = [_validate_one(path, overrides or []) for path in recipes]
    ok = all(r["valid"] for r in results)
    if as_json:
        typer.echo(json.dumps({"valid": ok, "recipes": results}, indent=2))
    else:
        _print_validation(results, show)
    if not ok:
        raise typer.Exit(2)


def _validate_one(path: Path, overrides: list[str]) -> dict[str, Any]:
    """One file's entry of `validate --json`: valid with its resolved recipe, or its located problems."""
    from finetune.errors import RecipeError
    from finetune.recipe.load import load_recipe
    from finetune.recipe.preflight import preflight
    from finetune.sweep.file import is_sweep_file, load_sweep

    try:
        if is_sweep_file(path):  # every combination of the sweep, validated as a recipe
            if overrides:
                raise UserError(f"{path}: --set applies to recipes; a sweep file sets its keys under fixed:")
            sweep = load_sweep(path)
            preflight(sweep.base)
            return {"path": str(path), "valid": True, "problems": [], "recipe": sweep.base.resolved(),
                    "trials": sweep.trial_count}  # fmt: skip
        recipe = load_recipe(path, overrides)
        preflight(recipe)
        return {"path": str(path), "valid": True, "problems": [], "recipe": recipe.resolved()}
    except RecipeError as e:
        problems = [{"where": p.where, "key": p.key, "message": p.message} for p in e.problems]
        return {"path": str(path), "valid": False, "problems": problems, "recipe": None}


def _print_validation(results: list[dict], show: bool) -> None:
    from finetune.recipe.yaml_source import dump

    for r in results:
        if r["valid"]:
            trials = f" (sweep: {r['trials']} trials, each a valid recipe)" if "trials" in r else ""
            typer.echo(f"ok: {r['path']}{trials}")
            if show:
                typer.echo(dump(r["recipe"]))
        for p in r["problems"]:
            head = " ".join(x for x in (p["where"], p["key"]) if x)
            typer.echo(f"error: {head}: {p['message']}", err=True)


@handles_errors
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The human reference (docs/reference/recipe.md) instead.")
    ] = False,
) -> None:
    """Print the recipe's JSON Schema, for editor completion and checking.

    Example: finetune schema -o recipe.schema.json   (then, first line of a recipe:
    # yaml-language-server: $schema=./recipe.schema.json)
    """
    if markdown:
        from finetune.recipe.docs import markdown as reference

        text = reference()
    else:
        from finetune.recipe.schema import Recipe

        text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)
