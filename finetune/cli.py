"""The `finetune` command line: parse arguments, call a stage, render its result, map errors.

Stages are plain functions in their own modules, imported inside the command that needs them
so that `finetune --help` and `finetune validate` never import torch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from finetune import __version__
from finetune.errors import NotImplementedStageError, TrainingInterrupted, UserError

app = typer.Typer(
    name="finetune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a recipe key, e.g. --set lora.rank=32 (repeatable).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def handles_errors(command):
    """Map errors to exit codes: UserError -> 2, interrupted -> 3, anything else -> 1 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as e:
            raise _fail("\n".join(f"error: {p}" for p in e.problems), e.exit_code) from None
        except (NotImplementedStageError, TrainingInterrupted) as e:
            raise _fail(f"error: {e}", e.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("FINETUNE_DEBUG"):
                raise
            raise _fail(f"error: {type(e).__name__}: {e}\n(set FINETUNE_DEBUG=1 for the traceback)", 1) from None

    return wrapper


def _not_built(what: str, issue: str) -> NotImplementedStageError:
    return NotImplementedStageError(f"`finetune {what}` is not built yet ({issue}); nothing was done.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune LLMs with LoRA and QLoRA from version-controlled YAML recipes.

    Example: finetune validate recipes/quickstart.yaml && finetune train recipes/quickstart.yaml
    """


@app.command()
@handles_errors
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML file(s).", show_default=False)],
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    show: Annotated[bool, typer.Option("--print", help="Print the fully resolved recipe.")] = False,
) -> None:
    """Check recipes (schema, extends, overrides, local files) without touching a model or GPU.

    Example: finetune validate recipes/*.yaml --set lora.rank=32
    """
    from finetune.errors import RecipeError
    from finetune.loading import load_recipe

    results = []
    for path in recipes:
        try:
            recipe = load_recipe(path, overrides or [])
            results.append({"path": str(path), "valid": True, "problems": [], "recipe": recipe.resolved()})
        except RecipeError as e:
            problems = [{"where": p.where, "key": p.key, "message": p.message} for p in e.problems]
            results.append({"path": str(path), "valid": False, "problems": problems, "recipe": None})
    ok = all(r["valid"] for r in results)
    if as_json:
        typer.echo(json.dumps({"valid": ok, "recipes": results}, indent=2))
    else:
        _print_validation(results, show)
    if not ok:
        raise typer.Exit(2)


def _print_validation(results: list[dict], show: bool) -> None:
    from finetune.yaml_source import dump

    for r in results:
        if r["valid"]:
            typer.echo(f"ok: {r['path']}")
            if show:
                typer.echo(dump(r["recipe"]))
        for p in r["problems"]:
            head = " ".join(x for x in (p["where"], p["key"]) if x)
            typer.echo(f"error: {head}: {p['message']}", err=True)


@app.command()
@handles_errors
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="The human reference (docs/recipe.md) instead.")] = False,
) -> None:
    """Print the recipe's JSON Schema, for editor completion and checking.

    Example: finetune schema -o recipe.schema.json   (then, first line of a recipe:
    # yaml-language-server: $schema=./recipe.schema.json)
    """
    if markdown:
        from finetune.reference import markdown as reference

        text = reference()
    else:
        from finetune.recipe import Recipe

        text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


@app.command()
@handles_errors
def train(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a LoRA/QLoRA adapter; writes runs/<name>/ (recipe, manifest, metrics, adapter).

    Example: finetune train recipes/quickstart.yaml --set quantization.method=nf4
    """
    from finetune.loading import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    from finetune.train import train as run_training

    result = run_training(loaded, overwrite=overwrite, resume=resume, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_train_result(result.to_dict())


def _print_train_result(r: dict) -> None:
    """The end of a run: where the adapter is, how long it took, and tuned vs base on held-out data."""
    from rich.console import Console

    console = Console(highlight=False)
    share = r["trainable_params"] / max(r["total_params"], 1)
    console.print(
        f"trained {r['steps']} steps in {r['seconds']:.0f}s, train loss {r['train_loss']:.4f}; "
        f"{r['trainable_params']:,} of {r['total_params']:,} parameters trained ({share:.2%})"
    )
    best = f" (best held-out loss at step {r['best_step']})" if r.get("best_step") else ""
    console.print(f"adapter: {r['adapter_dir']}{best}")
    if not r["eval"]:
        console.print("no held-out data (data.eval): nothing to compare against the base model")
        return
    console.print(_comparison_table(r["eval"]))


def _comparison_table(summary: dict) -> Any:
    """Held-out figures for base and tuned side by side, with the difference and per-example wins/losses."""
    from rich.table import Table

    tuned, base, versus = summary["tuned"], summary["base"], summary.get("vs_base", {})
    table = Table(title=f"held-out ({summary['examples']} examples)", title_justify="left")
    for column in ("metric", "base", "tuned", "delta", "wins/losses/ties"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in ("loss", "perplexity", *tuned["metrics"]):
        t = tuned["metrics"].get(key, tuned.get(key))
        b = None if base is None else base["metrics"].get(key, base.get(key))
        if t is None:
            continue
        fmt = "{:.2f}" if key == "perplexity" else "{:.4f}"
        delta = "" if b is None else ("{:+.2f}" if key == "perplexity" else "{:+.4f}").format(t - b)
        v = versus.get(key, {})
        record = f"{v['wins']}/{v['losses']}/{v['ties']}" if "wins" in v else ""
        table.add_row(key, "-" if b is None else fmt.format(b), fmt.format(t), delta, record)
    return table


@app.command()
@handles_errors
def plan(recipe: RecipeArg, overrides: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Trainable and total parameters, memory per component, steps and tokens, before any weight loads.

    Example: finetune plan recipes/llama-3.1-8b-qlora.yaml --json
    """
    raise _not_built("plan", "issue #6")


@app.command()
@handles_errors
def data(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    show: Annotated[int, typer.Option("--show", help="Render this many examples with trained tokens marked.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Dataset statistics and rendered examples with the trained tokens marked.

    Example: finetune data recipes/quickstart.yaml --show 5
    """
    raise _not_built("data", "issue #5")


@app.command(name="eval")
@handles_errors
def eval_(
    target: Annotated[Path, typer.Argument(help="Run directory, or the recipe that made it.", show_default=False)],
    against: Annotated[
        str | None, typer.Option("--against", help="`base`: also score the base model; `none`: tuned only.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score generation metrics on at most N rows.")] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", help="Exit 1 if a tuned metric is under a value, e.g. exact_match=0.8."),
    ] = None,
    fail_if_worse: Annotated[
        bool, typer.Option("--fail-if-worse-than-base", help="Exit 1 if any tuned figure is worse than the base's.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Held-out loss and metrics of the tuned model against its base, side by side; a CI gate.

    Example: finetune eval runs/quickstart --fail-under exact_match=0.8 --fail-if-worse-than-base
    """
    if against not in (None, "base", "none"):
        raise UserError(f"--against: use base or none, not {against!r}")
    thresholds = _thresholds(fail_under or [])
    from finetune.evaluate import evaluate, gate

    result = evaluate(target, against_base=None if against is None else against == "base", limit=limit)
    failures = gate(result.summary, thresholds, fail_if_worse)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "gate_failures": failures}, indent=2))
    else:
        from rich.console import Console

        Console(highlight=False).print(_comparison_table(result.summary))
        typer.echo(f"results: {Path(result.run_dir) / 'eval'}")
    if failures:
        raise _fail("\n".join(f"gate failed: {f}" for f in failures), 1)


def _thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UserError(f"--fail-under: expected METRIC=VALUE, got {item!r}")
    return out


@app.command()
@handles_errors
def merge(run_dirs: Annotated[list[Path], typer.Argument(help="Run directory (or several, to combine).")]) -> None:
    """Merge the adapter into its base model and verify the logits match.

    Example: finetune merge runs/quickstart --out merged/quickstart
    """
    raise _not_built("merge", "issue #8")


@app.command()
@handles_errors
def export(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Export the adapter or the merged model with a model card and a compatibility report.

    Example: finetune export runs/quickstart --format adapter
    """
    raise _not_built("export", "issue #8")


@app.command()
@handles_errors
def runs(action: Annotated[str, typer.Argument(help="list | show RUN | compare RUN RUN")] = "list") -> None:
    """List, show and compare runs.

    Example: finetune runs list
    """
    raise _not_built("runs", "issue #9")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
