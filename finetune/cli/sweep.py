"""`finetune sweep`: a recipe trained at every point of a grid or search, one run directory per trial, ranked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from finetune.cli.common import JsonOpt, console, echo_json, handles_errors

if TYPE_CHECKING:
    from finetune.sweep.file import Sweep
    from finetune.sweep.run import SweepResult


def register(app: typer.Typer) -> None:
    app.command()(sweep)


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
    from finetune.sweep.file import load_sweep

    loaded = load_sweep(sweep_file)
    if dry_run:
        from finetune.sweep.run import dry_run as list_trials

        rows = list_trials(loaded, gpu=gpu, tflops=tflops)
        if as_json:
            echo_json(rows)
        else:
            _print_sweep_plan(loaded, rows)
        return
    from finetune.sweep.run import sweep as run_sweep

    result = run_sweep(loaded, storage=storage, worker=worker, progress=not as_json)
    if as_json:
        echo_json(result.to_dict())
    else:
        _print_sweep(result)


def _wide_console() -> Any:
    """The terminal's width in a terminal; 200 columns in logs, so that they keep whole trial names."""
    return console() if sys.stdout.isatty() else console(width=200)


def _print_sweep_plan(s: Sweep, rows: list[dict[str, Any]]) -> None:
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
    _wide_console().print(table)
    if s.spec.search:
        typer.echo("a search draws its points as it goes: the first point of each range is planned above")


def _print_sweep(r: SweepResult) -> None:
    """The trials ranked by the metric, with the swept values, held-out loss, parameters and time.

    The trials are sweep.json's rows (its contract), read by their keys.
    """
    from rich.table import Table

    from finetune.units import duration

    arrow = "higher" if r.direction == "maximize" else "lower"
    table = Table(title=f"{r.metric} ({arrow} is better), {r.dir}", title_justify="left")
    for column in ("#", "trial", r.metric, "held-out loss", "trainable", "time", "status"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right", no_wrap=True)
    for t in r.trials:
        value = "-" if t["metric"] is None else f"{t['metric']:.4f}"
        value += f" ± {t['metric_std']:.4f}" if t.get("metric_std") else ""
        loss = t["figures"].get("loss")
        status = t["status"] + (
            f" (step {t['last_eval']['step']})" if t["status"] == "pruned" and t.get("last_eval") else ""
        )
        table.add_row(str(t["rank"] or ""), t["name"], value, "-" if loss is None else f"{loss:.4f}",
                      f"{t['trainable_params']:,}" if t.get("trainable_params") else "-",
                      duration(t["seconds"]) if t.get("seconds") else "-", status)  # fmt: skip
    out = _wide_console()
    out.print(table)
    for k in r.knees:
        group = ", ".join(f"{key} {v}" for key, v in k["group"].items())
        says = "still paid up to the largest rank tried," if k["still_paying"] else "stops paying at"
        out.print(f"{group + ': ' if group else ''}doubling the rank {says} rank {k['rank']} "
                  f"(margin {k['margin']:g} in {r.metric})")  # fmt: skip
    out.print(f"sweep.json and sweep.html in {r.dir}; trained this time: {len(r.trained)}")
