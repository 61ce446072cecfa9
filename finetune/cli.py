"""The `finetune` command line: parse arguments, call a stage, render its result, map errors.

Stages are plain functions in their own modules, imported inside the command that needs them
so that `finetune --help` and `finetune validate` never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from finetune import __version__
from finetune.errors import LaunchError, TrainingInterrupted, UserError

if TYPE_CHECKING:
    from finetune.summary import EvalSummary
    from finetune.train import TrainResult

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


def _console(**kwargs: Any) -> Any:
    """A rich console whose plain lines never wrap mid-sentence (logs and CI read them whole)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, **kwargs)


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
        except TrainingInterrupted as e:  # the graceful path (exit 3): not an error
            raise _fail(str(e), e.exit_code) from None
        except LaunchError as e:  # the launched processes have printed their own errors
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("FINETUNE_DEBUG"):
                raise
            raise _fail(f"error: {type(e).__name__}: {e}\n(set FINETUNE_DEBUG=1 for the traceback)", 1) from None

    return wrapper


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
    """Check recipes and sweep files (schema, extends, overrides, local files) without touching a model or GPU.

    Example: finetune validate recipes/*.yaml --set lora.rank=32
    """
    from finetune.errors import RecipeError
    from finetune.loading import load_recipe
    from finetune.preflight import preflight
    from finetune.sweep_file import is_sweep_file, load_sweep

    results = []
    for path in recipes:
        try:
            if is_sweep_file(path):  # every combination of the sweep, validated as a recipe
                if overrides:
                    raise UserError(f"{path}: --set applies to recipes; a sweep file sets its keys under fixed:")
                sweep = load_sweep(path)
                preflight(sweep.base)
                results.append({"path": str(path), "valid": True, "problems": [], "recipe": sweep.base.resolved(),
                                "trials": sweep.trial_count})  # fmt: skip
                continue
            recipe = load_recipe(path, overrides or [])
            preflight(recipe)
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
            trials = f" (sweep: {r['trials']} trials, each a valid recipe)" if "trials" in r else ""
            typer.echo(f"ok: {r['path']}{trials}")
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
    from finetune.preflight import preflight
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
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_train_result(result)


def _print_train_result(r: TrainResult) -> None:
    """The end of a run: where the adapter is, how long it took, and tuned vs base on held-out data."""
    console = _console()
    share = r.trainable_params / max(r.total_params, 1)
    console.print(
        f"trained {r.steps} steps in {r.seconds:.0f}s, train loss {r.train_loss:.4f}; "
        f"{r.trainable_params:,} of {r.total_params:,} parameters trained ({share:.2%})"
    )
    what = "reward" if r.eval and r.eval.preference and r.eval.preference.method == "grpo" else "loss"
    best = f" (best held-out {what} at step {r.best_step})" if r.best_step else ""
    console.print(f"adapter: {r.adapter_dir}{best}")
    if not r.eval:
        console.print("no held-out data (data.eval): nothing to compare against the base model")
        return
    _print_comparison(console, r.eval)


def _print_comparison(console: Any, summary: EvalSummary) -> None:
    if summary.preference is not None:
        console.print(_preference_table(summary.to_dict()))
        return
    console.print(_comparison_table(summary))
    if summary.harness:
        console.print(_harness_table(summary.harness))


def _harness_table(harness: dict) -> Any:
    """lm-evaluation-harness figures per task and metric, base and tuned side by side (eval/harness.json has all)."""
    from rich.table import Table

    table = Table(title="lm-eval harness", title_justify="left")
    for column in ("task", "metric", "base", "tuned", "delta"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in harness.items():
        for metric, f in metrics.items():
            row = [f"{f[k]:.4f}" if k in f else "-" for k in ("base", "tuned")]
            table.add_row(task, metric, *row, f"{f['delta']:+.4f}" if "delta" in f else "")
    return table


def _comparison_table(summary: EvalSummary) -> Any:
    """Held-out figures for base and tuned side by side, with the difference and per-example wins/losses."""
    from rich.table import Table

    table = Table(title=f"held-out ({summary.examples} examples)", title_justify="left")
    for column in ("metric", "base", "tuned", "delta", "wins/losses/ties"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in summary.rows():
        digits = 2 if row.metric == "perplexity" else 4
        base = "-" if row.base is None else f"{row.base:.{digits}f}"
        delta = "" if row.delta is None else f"{row.delta:+.{digits}f}"
        table.add_row(row.metric, base, f"{row.tuned:.{digits}f}", delta, row.record)
    return table


def _preference_table(summary: dict) -> Any:
    """A DPO, KTO or GRPO run's held-out figures: base, reference (the parent run) and tuned side by side."""
    from rich.table import Table

    names = [n for n in ("base", "reference", "tuned") if summary.get(n)]
    rows = {"dpo": f"{summary['pairs']} pairs, ", "kto": f"{summary['pairs']} rows, "}.get(summary["method"], "")
    title = f"held-out: {rows}{summary['examples']} prompts"
    table = Table(
        title=title + (" (reference = base)" if summary.get("reference_is_base") else ""), title_justify="left"
    )
    for column in ("metric", *names, "vs reference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    tuned, reference = summary["tuned"], summary["reference"]
    for key in tuned["metrics"]:
        cells = [f"{summary[n]['metrics'][key]:.4f}" for n in names]
        label = key.rsplit(":", 1)[-1]  # a module:function metric by its function's name
        table.add_row(label, *cells, f"{tuned['metrics'][key] - reference['metrics'][key]:+.4f}")
    for side in ("chosen", "rejected") if tuned.get("logps") else ():  # preference methods score both answers
        cells = [f"{summary[n]['logps'][side]:.3f}" for n in names]
        table.add_row(f"logp {side}", *cells, f"{tuned['logps'][side] - reference['logps'][side]:+.3f}")
    return table


@app.command()
@handles_errors
def plan(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="Estimate the time on this GPU: H100, H200, A100, L40S, A10G, RTX 4090."),
    ] = None,
    tflops: Annotated[
        float | None, typer.Option("--tflops", help="Estimate the time at this peak bf16 TFLOP/s instead.")
    ] = None,
    mfu: Annotated[
        float, typer.Option("--mfu", help="Share of the peak actually reached (model FLOPs utilisation).")
    ] = 0.4,
) -> None:
    """Trainable and total parameters, memory per component, steps and tokens, before any weight loads.

    Reads only config.json (and the tokenizer, for local data): no weights, no GPU.

    Example: finetune plan recipes/llama-3.1-8b-qlora.yaml --set model.base=path/to/config-dir --gpu H100
    """
    from finetune.loading import load_recipe
    from finetune.plan import plan as make_plan

    loaded = load_recipe(recipe, overrides or [])
    result = make_plan(loaded, gpu=gpu, tflops=tflops, mfu=mfu)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_plan(result.to_dict())


def _print_plan(r: dict) -> None:
    """The plan as tables: parameters per module, memory per component, GPUs it fits, work and time."""
    from rich.table import Table

    def gb(n: int | None) -> str:
        return "unknown" if n is None else f"{n / 1e9:.2f}"

    console = _console()
    p, m, w, t = r["params"], r["memory"], r["work"], r["time"]
    console.print(f"plan for {r['name']}: {r['model']} ({r['architecture']}, {r['layers']} layers)")
    table = Table(title="trainable parameters", title_justify="left")
    for column in ("module", "kind", "modules", "params", "share"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right")
    for row in p["by_module"]:
        share = row["params"] / max(p["trainable"], 1)
        table.add_row(row["name"], row["kind"], str(row["modules"]), f"{row['params']:,}", f"{share:.1%}")
    console.print(table)
    console.print(
        f"base {p['base']:,} parameters; trainable {p['trainable']:,} of {p['total']:,} ({p['trainable_share']:.3%})"
    )
    shape = f"micro-batch {m['micro_batch']} x {m['seq_length'] or '?'} tokens"
    auto = m["gradient_checkpointing"] == "auto"
    checkpointing = "auto: figures without it" if auto else "on" if m["gradient_checkpointing"] else "off"
    title = f"memory (GB = 10^9 bytes; {m['weights_dtype']} weights, {m['compute_dtype']} compute, {shape}, "
    table = Table(title=title + f"gradient checkpointing {checkpointing})", title_justify="left")
    for column in ("component", "GB", "as"):
        table.add_column(column, justify="right" if column == "GB" else "left", overflow="fold")
    for term in m["terms"]:
        table.add_row(term["name"], gb(term["bytes"]), term["detail"])
    total = gb(m["total"]) if m["total"] is not None else f">= {gb(m['lower_bound'])}"
    table.add_row("total", total, "")
    console.print(table)
    with_bytes = m["activations_with_checkpointing"]
    other = "with" if auto or not m["gradient_checkpointing"] else "without"
    other_bytes = with_bytes if other == "with" else m["activations_without_checkpointing"]
    if other_bytes is not None:
        console.print(f"activations {other} gradient checkpointing: {gb(other_bytes)} GB")
    table = Table(title="fits on a GPU of", title_justify="left")
    for column in ("memory", "fits", "headroom GB"):
        table.add_column(column, justify="left" if column == "memory" else "right")
    for fit in m["fits"]:
        ok = {True: "yes", False: "no", None: "unknown"}[fit["fits"]]
        headroom = "" if fit["headroom"] is None else f"{fit['headroom'] / 1e9:+.1f}"
        table.add_row(f"{fit['memory_gb']} GB", ok + (", with checkpointing" if fit["checkpointing"] else ""), headroom)
    console.print(table)
    if w["available"]:
        table = Table(title="work", title_justify="left")
        table.add_column("", justify="left")
        table.add_column("per epoch", justify="right")
        table.add_column("total", justify="right")
        table.add_row("optimizer steps", f"{w['steps_per_epoch']:,}", f"{w['total_steps']:,}")
        table.add_row("tokens", f"{w['tokens_per_epoch']:,}", f"{w['total_tokens']:,}")
        for label, key in (("trained tokens (loss)", "trained_tokens_per_epoch"), ("sequences", "sequences_per_epoch")):
            table.add_row(label, f"{w[key]:,}", f"{round(w[key] * w['epochs']):,}")
        console.print(table)
        console.print(
            f"{w['train_rows']:,} train rows, {w['eval_rows']:,} eval rows, max_seq_length {w['max_seq_length']}, "
            f"{w['truncated']:,} truncated, {w['dropped']:,} dropped; {w['epochs']:g} epoch(s)"
        )
    else:
        console.print(f"work: {w['note']}")
    if t is not None:
        where = t["gpu"] or "the given peak"
        line = (
            f"time on {where} ({t['peak_tflops']:g} TFLOP/s peak x MFU {t['mfu']:g}, "
            f"{t['flops_per_token']:.3g} FLOPs per token): "
        )
        from finetune.units import duration

        per_step = "?" if t["seconds_per_step"] is None else duration(t["seconds_per_step"])
        line += f"{per_step} per optimizer step of full-length sequences"
        if t["total_seconds"] is not None:
            line += f", {duration(t['total_seconds'])} for the whole run"
        console.print(line)
    for note in r["notes"]:
        console.print(f"note: {note}")


@app.command()
@handles_errors
def data(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    show: Annotated[int, typer.Option("--show", help="Render this many examples with trained tokens marked.")] = 3,
    color: Annotated[bool, typer.Option("--color/--no-color", help="Colour trained text (default: when a terminal).")]
    | None = None,
    as_json: JsonOpt = False,
) -> None:
    """Dataset statistics and rendered examples with the trained tokens marked (tokenizer only, no weights).

    Example: finetune data recipes/quickstart.yaml --show 5
    """
    from finetune.data.inspect import inspect_data
    from finetune.loading import load_recipe

    result = inspect_data(load_recipe(recipe, overrides or []), show)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_data(result, color)


def _skipped(source: dict) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in source.get("skipped_by_reason", {}).items())
    return f"{source['skipped']} skipped" + (f": {reasons}" if reasons else "")


def _print_data(result: Any, color: bool | None) -> None:
    from rich.table import Table
    from rich.text import Text

    if "paired" in result.stats:
        _print_preference_data(result)
        return
    if "prompt_lengths" in result.stats:
        _print_prompt_data(result)
        return

    console = _console(markup=False, no_color=color is False, force_terminal=color or None)
    s = result.stats
    table = Table(title="data", title_justify="left", show_header=False)
    for source in s["sources"]:
        table.add_row(f"source {source['path']}", f"{source['rows']} rows ({_skipped(source)}), {source['format']}")
    p = s["length_percentiles"]
    trained_share = s["trained_tokens"] / max(s["train_tokens"], 1)
    for label, value in (
        ("train / eval rows", f"{s['train_rows']} / {s['eval_rows']}"),
        ("duplicates train-eval", s["duplicates_train_eval"]),
        ("tokens per row (p50 p95 p99 max)", f"{p['p50']} {p['p95']} {p['p99']} {p['max']}"),
        ("max_seq_length", f"{s['max_seq_length']} (suggested: {s['suggested_max_seq_length']}, the p99 rounded up)"),
        (
            "rows over max_seq_length",
            f"{s['over_max_seq_length']} ({s['truncated']} truncated, {s['dropped']} dropped)",
        ),
        ("tokens trained / total", f"{s['trained_tokens']:,} / {s['train_tokens']:,} ({trained_share:.1%})"),
    ):
        table.add_row(label, str(value))
    console.print(table)
    peak = max((n for _, _, n in result.histogram), default=1)
    console.print("token length histogram (training rows, before truncation)")
    for low, high, n in result.histogram:
        console.print(f"  {low:>6}-{high:<6} {'#' * max(1 if n else 0, round(40 * n / peak)):<40} {n}")
    marked = color is False or (color is None and not console.is_terminal)
    legend = "[[trained text]] is in double brackets" if marked else "trained text is green"
    for e in result.examples:
        console.print(f"\n{e.where}: {e.tokens} tokens, {e.trained_tokens} trained ({legend})")
        text = Text()
        for piece, trained in e.pieces:
            if marked:
                text.append(f"[[{piece}]]" if trained else piece)
            else:
                text.append(piece, style="bold green" if trained else "dim")
        console.print(text)


def _print_preference_data(result: Any) -> None:
    """Preference rows: counts, token lengths per side, truncation, and examples with both answers."""
    from rich.markup import escape
    from rich.table import Table

    console, s = _console(), result.stats
    table = Table(title="preference data", title_justify="left", show_header=False)
    unit = "pairs" if s["paired"] else "rows"
    table.add_row(f"train / held-out {unit}", f"{s['train_rows']} / {s['eval_rows']}")
    if not s["paired"]:
        table.add_row("desirable / undesirable", f"{s['desirable']} / {s['undesirable']}")
    for side, q in s["lengths"].items():
        table.add_row(f"{side} tokens p50 / p95 / max", f"{q['p50']} / {q['p95']} / {q['max']}")
    table.add_row("max_seq_length", f"{s['max_seq_length']} (suggested: {s['suggested_max_seq_length']})")
    table.add_row(f"{unit} truncated", str(s["truncated"]))
    table.add_row("pairs truncated until chosen == rejected (dropped)", str(s["truncated_identical"]))
    table.add_row(f"{unit} dropped", str(s["dropped"]))
    table.add_row("duplicates train/held-out", str(s["duplicates_train_eval"]))
    console.print(table)
    for e in result.examples:
        t = e["tokens"]
        console.print(f"\n{e['where']}: prompt {t['prompt']} tokens, chosen {t['chosen']}, rejected {t['rejected']}")
        console.print(f"[dim]{escape(e['prompt'])}[/dim]")
        console.print(f"  chosen:   [bold green]{escape(repr(e['chosen']))}[/bold green]")
        console.print(f"  rejected: [bold red]{escape(repr(e['rejected']))}[/bold red]")


def _print_prompt_data(result: Any) -> None:
    """GRPO prompts: counts, token lengths, what was dropped, and examples with the reference the rewards get."""
    from rich.markup import escape
    from rich.table import Table

    console, s = _console(), result.stats
    table = Table(title="prompts (grpo)", title_justify="left", show_header=False)
    table.add_row("train / held-out prompts", f"{s['train_rows']} / {s['eval_rows']}")
    for label, q in (("prompt", s["prompt_lengths"]), ("reference", s["reference_lengths"])):
        table.add_row(f"{label} tokens p50 / p95 / max", f"{q['p50']} / {q['p95']} / {q['max']}")
    table.add_row("longest prompt + max_completion_length", str(s["max_seq_length"]))
    table.add_row("prompts dropped (over max_seq_length)", str(s["dropped"]))
    table.add_row("duplicates train/held-out", str(s["duplicates_train_eval"]))
    console.print(table)
    for e in result.examples:
        console.print(f"\n{e['where']}: prompt {e['tokens']} tokens")
        console.print(f"[dim]{escape(e['prompt'])}[/dim]")
        console.print(f"  reference: [bold green]{escape(repr(e['reference']))}[/bold green]")


@app.command(name="eval")
@handles_errors
def eval_(
    target: Annotated[Path, typer.Argument(help="Run directory, or the recipe that made it.", show_default=False)],
    against: Annotated[
        str | None, typer.Option("--against", help="`base`: also score the base model; `none`: tuned only.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Score at most N held-out rows (loss and generation metrics).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the results here; default RUN/eval/<UTC time>/.")
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require", help="Exit 1 unless a tuned figure meets a bound, e.g. 'exact_match>=0.8' or 'loss<=0.5'."
        ),
    ] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", help="Deprecated: --fail-under M=V is --require 'M>=V'.", hidden=True),
    ] = None,
    fail_if_worse: Annotated[
        bool, typer.Option("--fail-if-worse-than-base", help="Exit 1 if any tuned figure is worse than the base's.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Held-out loss and metrics of the tuned model against its base, side by side; a CI gate.

    Example: finetune eval runs/quickstart --require 'exact_match>=0.8' --require 'loss<=0.5' --fail-if-worse-than-base
    """
    from finetune.summary import Requirement, gate

    if against not in (None, "base", "none"):
        raise UserError(f"--against: use base or none, not {against!r}")
    requirements = [Requirement.parse(r) for r in require or []] + [Requirement.fail_under(f) for f in fail_under or []]
    if fail_under:
        typer.echo("warning: --fail-under is deprecated: use --require 'METRIC>=VALUE'", err=True)
    from finetune.evaluate import evaluate
    from finetune.runs import method_of

    if method_of(target) != "sft":
        from finetune.methods.preference_eval import evaluate_run as evaluate
    result = evaluate(target, against_base=None if against is None else against == "base", limit=limit, out=out)
    failures = gate(result.summary, requirements, fail_if_worse)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "gate_failures": failures}, indent=2))
    else:
        _print_comparison(_console(), result.summary)
        typer.echo(f"results: {result.out_dir} (the run's own eval/summary.json is unchanged)")
    if failures:
        raise _fail("\n".join(f"gate failed: {f}" for f in failures), 1)


@app.command()
@handles_errors
def merge(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directory, or several to combine their adapters.", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory; default RUN_DIR/merged. Required when combining."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="float32 | bfloat16 | float16, never 4-bit; default the recipe's model.dtype "
            "(auto: as in training, bfloat16 or float16 on a GPU, float32 on the CPU).",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="Combine several adapters: linear | ties | dare_linear | dare_ties | cat | svd."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Combining: one weight per adapter, e.g. 0.5,0.5; default equal, summing to 1."),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density", help="Combining with ties/dare_*: share of each adapter's entries kept; default 0.5."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge the adapter into its base model and verify the logits match; or combine several adapters into one.

    Example: finetune merge runs/quickstart --out merged/quickstart
    (combine: finetune merge runs/a runs/b --method ties --weights 0.5,0.5 --out runs/a-b)
    """
    from finetune.combine import CombineResult
    from finetune.merge import merge_runs

    progress = None if as_json else (lambda message: typer.echo(message, err=True))
    with _merge_check_reported(as_json):
        r = merge_runs(run_dirs, out, dtype, method, _weights(weights), density, overwrite=overwrite, progress=progress)
    if as_json:
        typer.echo(json.dumps(r.to_dict(), indent=2))
    elif isinstance(r, CombineResult):
        shown_density = f", density {r.density:g}" if r.density is not None else ""
        typer.echo(
            f"combined {len(r.parents)} adapters ({r.method}, weights {', '.join(f'{w:g}' for w in r.weights)}"
            f"{shown_density}) into {r.adapter_dir}: rank {r.rank} on {', '.join(r.targets)}"
        )
        for note in r.notes:
            typer.echo(f"note: {note}")
        typer.echo(f"next: finetune merge {r.out_dir}   or   finetune export {r.out_dir} --format adapter")
    else:
        typer.echo(
            f"merged {r.run_dir}/adapter ({r.variant}, rank {r.rank}) into {r.base} in {r.dtype}: "
            f"{r.out_dir} ({r.size_bytes / 1e6:.1f} MB)"
        )
        typer.echo(_check_line(r.check))
        for note in r.notes:
            typer.echo(f"note: {note}")


@contextlib.contextmanager
def _merge_check_reported(as_json: bool):
    """A failed merge check exits 1 with its message, and with --json prints the check's figures too."""
    from finetune.merge import MergeCheckError

    try:
        yield
    except MergeCheckError as e:
        if as_json:
            typer.echo(json.dumps({"passed": False, "check": e.check}, indent=2))
        raise _fail(f"error: {e}", 1) from None


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights: expected numbers separated by commas, e.g. 0.5,0.5 (got {text!r})") from None


def _check_line(c: dict) -> str:
    source = "eval/examples.jsonl" if c["prompts_from"].endswith("examples.jsonl") else c["prompts_from"]
    return (
        f"check: {c['prompts']} prompts ({c['tokens']} tokens, {source}): max |merged - unmerged| logit "
        f"{c['max_abs_diff']:.3g} (relative {c['max_rel_diff']:.3g}) <= tolerance {c['tolerance']:.3g}: passed; "
        f"the adapter moves logits by up to {c['adapter_effect']:.3g}; "
        f"greedy tokens agree at {c['argmax_agreement']:.1%} of positions"
    )


@app.command()
@handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="adapter: the PEFT adapter; merged: the verified merged model; gguf: llama.cpp files "
            "(merged, and base + GGUF adapter) verified with llama.cpp, and Ollama Modelfiles.", show_default=False
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory; default RUN_DIR/export/FORMAT.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="merged: float32 | bfloat16 | float16, as for finetune merge.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    quant: Annotated[list[str] | None, typer.Option(help="gguf: f32 | f16 | q8_0 | q4_k_m, repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the adapter or the merged model with a model card and a compatibility report.

    Example: finetune export runs/quickstart --format adapter
    """
    from finetune.export import TARGET_NAMES, verdict_word
    from finetune.export import export as export_run

    progress = None if as_json else (lambda message: typer.echo(message, err=True))
    with _merge_check_reported(as_json):
        result = export_run(run_dir, format, out, dtype=dtype, overwrite=overwrite, progress=progress, quants=quant)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    what = "adapter" if result.format == "adapter" else "merged model"
    typer.echo(f"exported the {what} of {result.run_dir} to {result.out_dir} ({len(result.files)} files)")
    if result.merge_check:
        typer.echo(_check_line(result.merge_check))
    for key, v in result.compat["targets"].items():
        typer.echo(f"  {TARGET_NAMES.get(key, key):<20} {verdict_word(v['works']):<14} {v['summary']}")
        for reason in v["reasons"]:
            typer.echo(f"  {'':<20} {'':<14} - {reason}")
        if v["command"]:
            typer.echo(f"  {'':<20} {'':<14} $ {v['command']}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"model card: {Path(result.out_dir) / 'README.md'}; report: {Path(result.out_dir) / 'compat.json'}")


@app.command()
@handles_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML file (recipe + grid or search).", show_default=False)],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and list the trials with plan's figures.")
    ] = False,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage: an RDB URL or a journal file path.")
    ] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Share the study with other workers running it.")] = False,
    gpu: Annotated[str | None, typer.Option("--gpu", help="--dry-run: estimate times on this GPU.")] = None,
    tflops: Annotated[float | None, typer.Option("--tflops", help="--dry-run: at this peak TFLOP/s.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a recipe at every point of a grid or search (Optuna); one run directory per trial, ranked.

    Rerunning skips completed trials and resumes interrupted ones. Example:
    finetune sweep recipes/quickstart-rank-sweep.yaml --dry-run && finetune sweep recipes/quickstart-rank-sweep.yaml
    """
    from finetune.sweep_file import load_sweep

    loaded = load_sweep(sweep_file)
    if dry_run:
        from finetune.sweep import dry_run as list_trials

        rows = list_trials(loaded, gpu=gpu, tflops=tflops)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _print_sweep_plan(loaded, rows)
        return
    from finetune.sweep import sweep as run_sweep

    result = run_sweep(loaded, storage=storage, worker=worker, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_sweep(result.to_dict())


def _print_sweep_plan(s: Any, rows: list[dict]) -> None:
    from rich.table import Table

    from finetune.units import duration

    kind = f"grid of {len(s.points())} point(s)" if s.spec.grid else f"search of {s.spec.search.trials} trial(s)"
    table = Table(title=f"sweep {s.name}: {kind} x {len(s.seeds)} seed(s) into {s.dir}", title_justify="left")
    for column in ("trial", "trainable params", "memory GB", "steps", "time", "status"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right", no_wrap=True)
    for r in rows:
        memory = "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 1e9:.2f}"
        time = "-" if r["seconds"] is None else duration(r["seconds"])
        table.add_row(r["name"], f"{r['trainable_params']:,}", memory, str(r["steps"] or "-"), time, r["status"])
    (_console() if sys.stdout.isatty() else _console(width=200)).print(table)
    if s.spec.search:
        typer.echo("a search draws its points as it goes: the first point of each range is planned above")


def _print_sweep(r: dict) -> None:
    """The trials ranked by the metric, with the swept values, held-out loss, parameters and time."""
    from rich.table import Table

    from finetune.units import duration

    arrow = "higher" if r["direction"] == "maximize" else "lower"
    table = Table(title=f"{r['metric']} ({arrow} is better), {r['dir']}", title_justify="left")
    for column in ("#", "trial", r["metric"], "held-out loss", "trainable", "time", "status"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right", no_wrap=True)
    for t in r["trials"]:
        value = "-" if t["metric"] is None else f"{t['metric']:.4f}"
        value += f" ± {t['metric_std']:.4f}" if t.get("metric_std") else ""
        loss = t["figures"].get("loss")
        status = t["status"] + (
            f" (step {t['last_eval']['step']})" if t["status"] == "pruned" and t.get("last_eval") else ""
        )
        table.add_row(str(t["rank"] or ""), t["name"], value, "-" if loss is None else f"{loss:.4f}",
                      f"{t['trainable_params']:,}" if t.get("trainable_params") else "-",
                      duration(t["seconds"]) if t.get("seconds") else "-", status)  # fmt: skip
    console = _console() if sys.stdout.isatty() else _console(width=200)  # logs keep whole trial names
    console.print(table)
    for k in r["knees"]:
        group = ", ".join(f"{key} {v}" for key, v in k["group"].items())
        says = "still paid up to the largest rank tried," if k["still_paying"] else "stops paying at"
        console.print(f"{group + ': ' if group else ''}doubling the rank {says} rank {k['rank']} "
                      f"(margin {k['margin']:g} in {r['metric']})")  # fmt: skip
    console.print(f"sweep.json and sweep.html in {r['dir']}; trained this time: {len(r['trained'])}")


@app.command()
@handles_errors
def chat(
    target: Annotated[
        Path, typer.Argument(help="Run directory, its recipe, or a merged model directory.", show_default=False)
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Answer this prompt and exit (repeatable); else stdin lines."),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Talk to the base model (the adapter disabled).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Base and tuned answers, side by side.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the run's eval.max_new_tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="0 (the default) decodes greedily, as eval does.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (with a temperature).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with a run: its own tokenizer, chat template and stop tokens, streamed; /reset, /system TEXT, /quit.

    Example: finetune chat runs/quickstart --compare -p "Reverse the list: width, socket, when"
    """
    from finetune.chat import Conversation, load, repl, sampling_for
    from finetune.chat import chat as chat_stage

    which = ("base", "tuned") if compare else ("base",) if base else ("tuned",)
    scripted = prompt is not None or not sys.stdin.isatty()
    stdin = [line.rstrip("\n") for line in sys.stdin if line.strip()] if scripted and prompt is None else []
    prompts = list(prompt) if prompt is not None else stdin
    loaded = load(target)
    if not scripted:
        import readline  # noqa: F401  (line editing and history for input())

        conversation = Conversation(loaded, sampling_for(loaded, max_new_tokens, temperature, top_p, seed), system)
        return repl(conversation, which, input, sys.stdout)
    result = chat_stage(target, prompts, which, system, max_new_tokens, temperature, top_p, seed, loaded=loaded)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    elif compare:
        from rich.table import Table

        table = Table("prompt", "base", "tuned", show_lines=True)
        for row in result.answers:
            table.add_row(row["prompt"], row["base"], row["tuned"])
        _console().print(table)
    else:
        for row in result.answers:
            typer.echo(row[which[0]])


@app.command()
@handles_errors
def serve(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories (or recipes), all on one base.", show_default=False)
    ],
    host: Annotated[str, typer.Option(help="Address to bind; a non-local one needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="FINETUNE_API_KEY", show_envvar=True, help="Required on every request.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Default and largest max_tokens of a request.")] = 1024,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Largest prompt; default the model's context.")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503.")] = 32,
    max_lora_rank: Annotated[int | None, typer.Option(help="Refuse adapters of a higher rank.")] = None,
    engine: Annotated[
        str, typer.Option(help="transformers (this process) or vllm (starts vLLM's server).")
    ] = "transformers",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="--engine vllm: print vLLM's command, start nothing.")
    ] = False,
) -> None:
    """Serve runs' adapters on one base through an OpenAI-compatible API; `model` = run name.

    Example: finetune serve runs/a runs/b --port 8000   # then: OpenAI(base_url="http://127.0.0.1:8000/v1")
    """
    from finetune import serve as stage

    if engine not in ("transformers", "vllm"):
        raise UserError(f"--engine: transformers or vllm, not {engine!r}")
    stage.check_bind(host, api_key)
    if engine == "vllm":
        plan = stage.vllm_plan(list(runs), host, port)
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)
        if dry_run:
            return typer.echo(plan.shell())
        raise typer.Exit(stage.run_vllm(plan, api_key))
    limits = stage.Limits(max_tokens, max_prompt_tokens, max_body_bytes, max_queue, max_lora_rank)
    ready = lambda m: typer.echo(f"serving {', '.join(m.names())} at http://{host}:{port}/v1", err=True)  # noqa: E731
    stage.serve(list(runs), host, port, api_key, limits, ready)


runs_app = typer.Typer(
    help="List, show and compare runs.\n\nExample: finetune runs list runs/ && finetune runs compare runs/a runs/b",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
@handles_errors
def runs_list(
    directory: Annotated[Path, typer.Argument(help="Folder holding run directories.")] = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Runs under a folder, newest first: status, base, rank, best held-out loss, key metric, duration.

    Example: finetune runs list runs/ --json
    """
    from finetune.runs import list_runs

    rows = list_runs(directory)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    import shutil

    typer.echo(_runs_table(rows, shutil.get_terminal_size().columns))


def _runs_table(rows: list[dict], width: int) -> str:
    """One line per run within `width` columns: run, base and metric shortened (with …) before anything else."""
    lines = [["run", "status", "base", "rank", "eval loss", "metric", "time"]]
    for r in rows:
        base = str(r["base"])
        lines.append([
            str(r["name"]), str(r["status"]),
            f".../{Path(base).name}" if base.startswith(("/", "./", "../", "~")) else base,
            str(r["rank"]),
            f"{r['best_eval_loss']:.4f}" if r["best_eval_loss"] is not None else "",
            f"{r['metric'][0]} {r['metric'][1]:.4f}" if r["metric"] else "",
            f"{r['seconds']:.0f}s" if r["seconds"] is not None else "",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(7)]
    shrinkable = (0, 2, 5)  # run, base, metric
    floors = {0: 8, 2: 8, 5: 12}
    while sum(widths) + 2 * 6 > width and any(widths[i] > floors[i] for i in shrinkable):
        widest = max((i for i in shrinkable if widths[i] > floors[i]), key=lambda i: widths[i])
        widths[widest] -= 1

    def cell(text: str, i: int) -> str:
        if len(text) > widths[i] and i == 5:  # keep the metric's value, shorten its name
            name, _, value = text.rpartition(" ")
            text = name[: max(widths[i] - len(value) - 2, 1)] + "… " + value
        text = text if len(text) <= widths[i] else text[: widths[i] - 1] + "…"
        return text.rjust(widths[i]) if i in (3, 4, 6) else text.ljust(widths[i])

    out = ["  ".join(cell(text, i) for i, text in enumerate(line)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


@runs_app.command("show")
@handles_errors
def runs_show(run: Annotated[Path, typer.Argument(help="Run directory.")], as_json: JsonOpt = False) -> None:
    """A run's manifest: provenance, status, figures.

    Example: finetune runs show runs/quickstart
    """
    from finetune.runs import show_run

    manifest = show_run(run)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    from finetune.lineage import lineage
    from finetune.yaml_source import dump

    if manifest.get("parent"):
        typer.echo("lineage: " + " → ".join(lineage(manifest)))
    typer.echo(dump(manifest))


@runs_app.command("compare")
@handles_errors
def runs_compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")], as_json: JsonOpt = False
) -> None:
    """The recipe keys that differ between runs and their held-out figures, with deltas to the first.

    Example: finetune runs compare runs/r8 runs/r16
    """
    from finetune.runs import compare_runs

    if len(run_dirs) < 2:
        raise UserError("runs compare: give at least two run directories")
    result = compare_runs(run_dirs)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.table import Table

    console = _console()
    names = [Path(r).name for r in result["runs"]]
    diff = Table(title="recipe differences", title_justify="left")
    for column in ("key", *names):
        diff.add_column(column)
    for key, values in result["recipe_differences"].items():
        diff.add_row(key, *(json.dumps(v) for v in values))
    console.print(diff)
    figures = Table(title="figures (delta to the first run)", title_justify="left")
    for column in ("figure", *names):
        figures.add_column(column, justify="left" if column == "figure" else "right")
    for key in result["figures"][0]:
        cells = [
            f"{f[key]:.4f}" + (f" ({d[key]:+.4f})" if i else "") if key in f else "-"
            for i, (f, d) in enumerate(zip(result["figures"], result["deltas"], strict=True))
        ]
        figures.add_row(key, *cells)
    console.print(figures)


def main() -> None:
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    app()


if __name__ == "__main__":
    main()
