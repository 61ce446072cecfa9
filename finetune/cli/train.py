"""`finetune train`: a recipe checked in a second, then trained; the result as a table or JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from finetune.cli.common import JsonOpt, RecipeArg, SetOpt, console, echo_json, handles_errors
from finetune.cli.render import print_comparison

if TYPE_CHECKING:
    from finetune.train import TrainResult


def register(app: typer.Typer) -> None:
    app.command()(train)


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
    from finetune.recipe.load import load_recipe
    from finetune.recipe.preflight import preflight
    from finetune.runs import RunDir

    loaded = load_recipe(recipe, overrides or [])  # a bad recipe exits 2 before torch is imported
    preflight(loaded)  # so does a bad metric module or model directory
    if resume and not overwrite:
        RunDir(loaded.run_dir).refuse_resume()  # a finished run is refused in a second, not after the imports
    from finetune.train import train as run_training

    result = run_training(loaded, overwrite=overwrite, resume=resume, progress=not as_json)
    if not result.main_process:
        return
    if as_json:
        echo_json(result.to_dict())
    else:
        print_train_result(result)


def print_train_result(r: TrainResult) -> None:
    """The end of a run: where the adapter is, how long it took, and tuned vs base on held-out data."""
    out = console()
    share = r.trainable_params / max(r.total_params, 1)
    out.print(
        f"trained {r.steps} steps in {r.seconds:.0f}s, train loss {r.train_loss:.4f}; "
        f"{r.trainable_params:,} of {r.total_params:,} parameters trained ({share:.2%})"
    )
    what = "reward" if r.eval and r.eval.preference and r.eval.preference.method == "grpo" else "loss"
    best = f" (best held-out {what} at step {r.best_step})" if r.best_step else ""
    out.print(f"adapter: {r.adapter_dir}{best}")
    if not r.eval:
        out.print("no held-out data (data.eval): nothing to compare against the base model")
        return
    print_comparison(out, r.eval)
