"""`finetune review` (what a change does to the recipes) and `finetune reproduce` (a run's inputs checked, the run
retrained and compared); the stages are finetune/review.py and finetune/reproduce.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finetune.cli.common import JsonOpt, echo_json, fail, handles_errors


def register(app: typer.Typer) -> None:
    app.command()(review)
    app.command()(reproduce)


@handles_errors
def review(
    paths: Annotated[
        list[str] | None, typer.Argument(help="Recipes or folders to review (default: the whole repository).")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Compare with this git ref (default: merge base with main).")
    ] = None,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Markdown for a pull-request comment.")] = False,
    as_json: JsonOpt = False,
    max_memory_gb: Annotated[
        float | None, typer.Option("--max-memory-gb", help="Exit 1 when a changed recipe's peak memory is above.")
    ] = None,
    max_gpu_hours: Annotated[
        float | None, typer.Option("--max-gpu-hours", help="Exit 1 when a changed recipe's GPU time (H100) is above.")
    ] = None,
    fail_on_data_change: Annotated[
        bool, typer.Option("--fail-on-data-change", help="Exit 1 when a changed recipe's data files changed.")
    ] = False,
) -> None:
    """What a change does to the recipes: validity, resolved diff with origins, plan and data of both versions.

    Every recipe and sweep file whose resolved content (fragments and read files included) differs from
    the base commit; exit 2 when one is invalid, 1 when a gate fails.

    Example: finetune review --base HEAD~1 --markdown > review.md
    """
    from finetune.review import gate, markdown
    from finetune.review import review as run_review

    result = run_review(base, paths or [])
    failures = gate(result, max_memory_gb, max_gpu_hours, fail_on_data_change)
    if as_json:
        echo_json({**result.to_dict(), "gate_failures": failures})
    elif as_markdown:
        typer.echo(markdown(result, failures), nl=False)
    else:
        _print_review(result)
    invalid = [f"{r.path}: {p}" for r in result.recipes for p in r.problems]
    if invalid:
        raise fail("\n".join(f"error: {line}" for line in invalid), 2)
    if failures:
        raise fail("\n".join(f"gate failed: {line}" for line in failures), 1)


def _print_review(result: Any) -> None:
    """One block per changed recipe: what changed, where, and the figures that moved."""
    from finetune.review import SUMMARY_FIGURES, change_text, figure_text

    typer.echo(f"{len(result.recipes)} recipe(s) changed against {result.base} ({result.commit[:10]}), "
               f"{result.unchanged} unchanged")  # fmt: skip
    for r in result.recipes:
        typer.echo(f"\n{r.path}: {r.status}{'' if r.valid else ', INVALID'}")
        for c in r.changes:
            typer.echo(f"  {c.key}: {c.old} -> {c.new}  ({c.new_where})")
        for f in r.files:
            typer.echo(f"  file {f.path}: {(f.old_sha256 or 'absent')[:12]} -> {(f.new_sha256 or 'absent')[:12]}")
        for f in [*r.plan, *r.data]:
            if f.old != f.new:
                typer.echo(
                    f"  {f.name}: {figure_text(f.old, f.unit)} -> {figure_text(f.new, f.unit)} ({change_text(f)})"
                )
        for t in r.trials:
            moved = [f"{f.name} {figure_text(f.old, f.unit)} -> {figure_text(f.new, f.unit)}"
                     for f in t.plan if f.name in SUMMARY_FIGURES and f.old != f.new]  # fmt: skip
            typer.echo(f"  trial {t.name}: {t.status}" + (f" ({'; '.join(moved)})" if moved else ""))
        for note in r.not_computed:
            typer.echo(f"  could not compute {note}")


@handles_errors
def reproduce(
    run: Annotated[Path, typer.Argument(help="Run directory to reproduce.", show_default=False)],
    only_check: Annotated[
        bool, typer.Option("--check", help="Compare the recorded inputs with what is here now; train nothing.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory of the reproduction (default: RUN-reproduced).")
    ] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Largest |difference| per tensor and per logged loss accepted.")
    ] = 0.0,
    with_parents: Annotated[
        bool, typer.Option("--with-parents", help="Reproduce the parent run first (preference, GRPO runs).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retrain a run from its manifest's recorded recipe and seed, and prove the adapter identical.

    Exit 0 when identical (or within --tolerance), 1 otherwise, naming the first divergence and the
    inputs that differ. With --check: exit 0 when every recorded input matches, 1 otherwise.

    Example: finetune reproduce runs/quickstart --check && finetune reproduce runs/quickstart
    """
    from finetune import reproduce as stage

    if only_check:
        checked = stage.check(run)
        if as_json:
            echo_json(checked.to_dict())
        else:
            _print_inputs(checked, everything=True)
        if not checked.matches:
            raise fail(f"differs: {', '.join(i.name for i in checked.differing)}", 1)
        return
    result = stage.reproduce(run, out, tolerance, with_parents, progress=not as_json)
    if as_json:
        echo_json(result.to_dict())
    else:
        _print_reproduction(result)
    if not result.ok:
        raise fail(_divergence(result), 1)


def _print_inputs(checked: Any, everything: bool) -> None:
    for i in checked.inputs:
        if i.matches and everything:
            typer.echo(f"  same  {i.name}: {i.now}" if i.recorded == i.now else f"  ----  {i.name}: {i.recorded}")
        elif not i.matches:
            typer.echo(f"  DIFF  {i.name}: recorded {i.recorded}, now {i.now}")


def _print_reproduction(r: Any) -> None:
    """The inputs that differ, the adapter's tensors, the loss curve and held-out figures, in a few lines."""
    for parent in r.parents:
        _print_reproduction(parent)
    typer.echo(f"{r.run} -> {r.out}")
    for pin in r.pinned:
        typer.echo(f"  pinned --set {pin}: the run's recorded dtype (auto resolves to another here)")
    _print_inputs(r.check, everything=False)
    worst = max(r.tensors, key=lambda t: -1 if t.max_abs_diff is None else t.max_abs_diff, default=None)
    typer.echo(f"  adapter: {len(r.tensors)} tensors, " + ("bit-identical" if r.identical else
               f"max |diff| {r.max_abs_diff} ({worst.name if worst else '-'})"))  # fmt: skip
    d = r.first_divergence
    typer.echo(f"  loss: {r.steps_compared} logged steps, " + ("none diverge" if d is None else
               f"first divergence at step {d.step}: {d.original} vs {d.reproduced}"))  # fmt: skip
    for h in r.held_out:
        typer.echo(f"  held-out {h.name}: {h.original} vs {h.reproduced}")
    typer.echo(f"  {'identical' if r.identical else 'within tolerance' if r.ok else 'NOT reproduced'}; "
               f"{Path(r.out) / 'reproduction.json'}")  # fmt: skip


def _divergence(r: Any) -> str:
    """Why a reproduction failed: the first divergence, and the inputs that differed."""
    d = r.first_divergence
    where = f"first divergence at step {d.step}" if d else f"adapter max |diff| {r.max_abs_diff}"
    differing = ", ".join(i.name for i in r.check.differing) or "none"
    return f"not reproduced: {where} (tolerance {r.tolerance:g}); inputs that differ: {differing}"
