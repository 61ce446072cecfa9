"""`finetune plan`: parameters, memory per component, the GPUs it fits, work and time, before any weight loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from finetune.cli.common import JsonOpt, RecipeArg, SetOpt, console, echo_json, handles_errors

if TYPE_CHECKING:
    from finetune.plan import Memory, Params, PlanResult, Time, Work


def register(app: typer.Typer) -> None:
    app.command()(plan)


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
    from finetune.plan import plan as make_plan
    from finetune.recipe.load import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    result = make_plan(loaded, gpu=gpu, tflops=tflops, mfu=mfu)
    if as_json:
        echo_json(result.to_dict())
    else:
        print_plan(result)


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f}"


def print_plan(r: PlanResult) -> None:
    """The plan as tables: parameters per module, memory per component, GPUs it fits, work and time."""
    out = console()
    out.print(f"plan for {r.name}: {r.model} ({r.architecture}, {r.layers} layers)")
    _print_params(out, r.params)
    _print_memory(out, r.memory)
    _print_work(out, r.work)
    if r.time is not None:
        _print_time(out, r.time)
    for note in r.notes:
        out.print(f"note: {note}")


def _print_params(out: Any, p: Params) -> None:
    from rich.table import Table

    table = Table(title="trainable parameters", title_justify="left")
    for column in ("module", "kind", "modules", "params", "share"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right")
    for row in p.by_module:
        share = row.params / max(p.trainable, 1)
        table.add_row(row.name, row.kind, str(row.modules), f"{row.params:,}", f"{share:.1%}")
    out.print(table)
    out.print(f"base {p.base:,} parameters; trainable {p.trainable:,} of {p.total:,} ({p.trainable_share:.3%})")
    for line in p.ranks:
        out.print(f"adapters: {line}")


def _print_memory(out: Any, m: Memory) -> None:
    from rich.table import Table

    shape = f"micro-batch {m.micro_batch} x {m.seq_length or '?'} tokens"
    auto = m.gradient_checkpointing == "auto"
    checkpointing = "auto: figures without it" if auto else "on" if m.gradient_checkpointing else "off"
    title = f"memory (GB = 10^9 bytes; {m.weights_dtype} weights, {m.compute_dtype} compute, {shape}, "
    table = Table(title=title + f"gradient checkpointing {checkpointing})", title_justify="left")
    for column in ("component", "GB", "as"):
        table.add_column(column, justify="right" if column == "GB" else "left", overflow="fold")
    for term in m.terms:
        table.add_row(term.name, _gb(term.bytes), term.detail)
    table.add_row("total", _gb(m.total) if m.total is not None else f">= {_gb(m.lower_bound)}", "")
    out.print(table)
    other = "with" if auto or not m.gradient_checkpointing else "without"
    other_bytes = m.activations_with_checkpointing if other == "with" else m.activations_without_checkpointing
    if other_bytes is not None:
        out.print(f"activations {other} gradient checkpointing: {_gb(other_bytes)} GB")
    table = Table(title="fits on a GPU of", title_justify="left")
    for column in ("memory", "fits", "headroom GB"):
        table.add_column(column, justify="left" if column == "memory" else "right")
    for fit in m.fits:
        ok = {True: "yes", False: "no", None: "unknown"}[fit.fits]
        headroom = "" if fit.headroom is None else f"{fit.headroom / 1e9:+.1f}"
        table.add_row(f"{fit.memory_gb} GB", ok + (", with checkpointing" if fit.checkpointing else ""), headroom)
    out.print(table)


def _print_work(out: Any, w: Work) -> None:
    from rich.table import Table

    if not w.available:
        out.print(f"work: {w.note}")
        return
    table = Table(title="work", title_justify="left")
    table.add_column("", justify="left")
    table.add_column("per epoch", justify="right")
    table.add_column("total", justify="right")
    table.add_row("optimizer steps", f"{w.steps_per_epoch:,}", f"{w.total_steps:,}")
    table.add_row("tokens", f"{w.tokens_per_epoch:,}", f"{w.total_tokens:,}")
    for label, per_epoch in (
        ("trained tokens (loss)", w.trained_tokens_per_epoch),
        ("sequences", w.sequences_per_epoch),
    ):
        table.add_row(label, f"{per_epoch:,}", f"{round(per_epoch * w.epochs):,}")
    out.print(table)
    if w.note:
        out.print(w.note)
    out.print(
        f"{w.train_rows:,} train rows, {w.eval_rows:,} eval rows, max_seq_length {w.max_seq_length}, "
        f"{w.truncated:,} truncated, {w.dropped:,} dropped; {w.epochs:g} epoch(s)"
    )
    for m in w.mix:  # weighted sources: what an epoch over the mix draws from each
        out.print(f"  mix {m['path']}: weight {m['weight']:.2f}, {m['effective_rows']:,} rows per epoch from "
                  f"{m['rows']:,} ({m['times_seen']:g}x each), {m['tokens']:,} tokens")  # fmt: skip


def _print_time(out: Any, t: Time) -> None:
    from finetune.units import duration

    where = t.gpu or "the given peak"
    line = (
        f"time on {where} ({t.peak_tflops:g} TFLOP/s peak x MFU {t.mfu:g}, {t.flops_per_token:.3g} FLOPs per token): "
    )
    per_step = "?" if t.seconds_per_step is None else duration(t.seconds_per_step)
    line += f"{per_step} per optimizer step of full-length sequences"
    if t.total_seconds is not None:
        line += f", {duration(t.total_seconds)} for the whole run"
    out.print(line)
