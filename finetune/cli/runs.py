"""`finetune runs list | show | compare`: runs read back from their directories, within the terminal's width."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from finetune.cli.common import JsonOpt, console, echo_json, handles_errors
from finetune.errors import UserError

if TYPE_CHECKING:
    from rich.table import Table

    from finetune.runs import RunComparison, RunRow

runs_app = typer.Typer(
    help="List, show and compare runs.\n\nExample: finetune runs list runs/ && finetune runs compare runs/a runs/b",
    no_args_is_help=True,
)
FLOORS = {0: 8, 2: 8, 5: 12}  # narrowest run, base and metric columns; the others are never shortened


def register(app: typer.Typer) -> None:
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
        echo_json([r.to_dict() for r in rows])
        return
    import shutil

    typer.echo(runs_table(rows, shutil.get_terminal_size().columns))


def runs_table(rows: list[RunRow], width: int) -> str:
    """One line per run within `width` columns: run, base and metric shortened (with …) before anything else.

    A run name first loses the prefix every run shares (a sweep's trials are `SWEEP_rank-8_targets-attention`),
    then its middle, and never so much that two runs look alike: distinct names stay distinct, even past `width`.
    """
    lines = [["run", "status", "base", "rank", "eval loss", "metric", "time"]]
    for r in rows:
        base = str(r.base)
        lines.append([
            str(r.name), r.status,
            f".../{Path(base).name}" if base.startswith(("/", "./", "../", "~")) else base,
            str(r.rank),
            f"{r.best_eval_loss:.4f}" if r.best_eval_loss is not None else "",
            f"{r.metric[0]} {r.metric[1]:.4f}" if r.metric else "",
            f"{r.seconds:.0f}s" if r.seconds is not None else "",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(7)]
    names = [line[0] for line in lines[1:]]
    shared = _shared_prefix(names)
    floors = {**FLOORS, 0: _distinct_width(names, shared, widths[0])}
    while sum(widths) + 2 * 6 > width and any(widths[i] > floors[i] for i in floors):
        widest = max((i for i in floors if widths[i] > floors[i]), key=lambda i: widths[i])
        widths[widest] -= 1

    def cell(text: str, i: int) -> str:
        if len(text) > widths[i] and i == 0:
            text = _shorten(text, shared, widths[i])
        if len(text) > widths[i] and i == 5:  # keep the metric's value, shorten its name
            name, _, value = text.rpartition(" ")
            text = name[: max(widths[i] - len(value) - 2, 1)] + "… " + value
        text = text if len(text) <= widths[i] else text[: widths[i] - 1] + "…"
        return text.rjust(widths[i]) if i in (3, 4, 6) else text.ljust(widths[i])

    out = ["  ".join(cell(text, i) for i, text in enumerate(line)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _shared_prefix(names: list[str]) -> str:
    """What every name starts with, up to its last `_` (a sweep's name before its trials'); "" for a single run."""
    if len(names) < 2:
        return ""
    common = names[0]
    for name in names[1:]:
        while not name.startswith(common):
            common = common[:-1]
    return common[: common.rfind("_") + 1]


def _shorten(name: str, shared: str, width: int) -> str:
    """`…rank-16_t…all-linear`: the shared prefix dropped first, then the middle; both marked with an ellipsis."""
    if len(name) <= width:
        return name
    if shared:
        name = "…" + name[len(shared) :]
        if len(name) <= width:
            return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def _distinct_width(names: list[str], shared: str, widest: int) -> int:
    """The narrowest run column (from FLOORS[0]) at which the shortened names are as distinct as the names."""
    wanted = len(set(names))
    for width in range(min(FLOORS[0], widest), widest):
        if len({_shorten(n, shared, width) for n in names}) == wanted:
            return width
    return widest


@runs_app.command("show")
@handles_errors
def runs_show(run: Annotated[Path, typer.Argument(help="Run directory.")], as_json: JsonOpt = False) -> None:
    """A run's manifest: provenance, status, figures.

    Example: finetune runs show runs/quickstart
    """
    from finetune.runs import show_run

    manifest = show_run(run)
    if as_json:
        echo_json(manifest)
        return
    from finetune.lineage import lineage
    from finetune.recipe.yaml_source import dump

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
        echo_json(result.to_dict())
        return
    out = console()
    out.print(differences_table(result))
    out.print(figures_table(result))


def differences_table(result: RunComparison) -> Table:
    """One row per differing value, down to the item of a list (`data.train.0.path`), each shown whole (folded)."""
    from rich.table import Table

    table = Table(title="recipe differences", title_justify="left", show_lines=True)
    table.add_column("key", no_wrap=True)
    for name in (Path(r).name for r in result.runs):
        table.add_column(name, overflow="fold")
    for key, values in result.recipe_differences.items():
        leaves = [_leaves(v, key) for v in values]
        for leaf in dict.fromkeys(k for run in leaves for k in run):
            cells = [json.dumps(run.get(leaf)) for run in leaves]
            if len(set(cells)) > 1:
                table.add_row(leaf, *cells)
    return table


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """A value split into its leaves by dotted key, lists of mappings by item (`data.train.0.path`)."""
    if isinstance(value, dict):
        return {k: v for sub, item in value.items() for k, v in _leaves(item, f"{key}.{sub}").items()}
    if isinstance(value, list) and value and all(isinstance(item, dict | list) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{key}.{i}").items()}
    return {key: value}


def figures_table(result: RunComparison) -> Table:
    """Every run's held-out figures, each with its delta to the first run where the first has that figure."""
    from rich.table import Table

    title = "figures (delta to the first run"
    title += "; [95% paired bootstrap interval] on the prompts both answered)" if any(result.intervals) else ")"
    table = Table(title=title, title_justify="left")
    table.add_column("figure", justify="left")
    for name in (Path(r).name for r in result.runs):
        table.add_column(name, justify="right")
    intervals = result.intervals or [{} for _ in result.runs]
    for key in result.figure_names():
        cells = []
        for i, (f, d, paired) in enumerate(zip(result.figures, result.deltas, intervals, strict=True)):
            delta = f" ({d[key]:+.4f})" if i and key in d else ""
            if i and key in paired:
                p, n = paired[key], 4 if key.partition("[")[0] == "loss" else 2  # a loss moves in smaller steps
                delta = f" ({p['delta']:+.{n}f} [{p['low']:+.{n}f}, {p['high']:+.{n}f}])"
            cells.append(f"{f[key]:.4f}{delta}" if key in f else "-")
        table.add_row(_figure_label(key, result.slice_rows), *cells)
    return table


def _figure_label(key: str, slice_rows: dict[str, int]) -> str:
    """`exact_match[short] (34 rows)`: a slice's figure with its held-out row count (escaped: not rich markup)."""
    from rich.markup import escape

    name = key[key.rfind("[") + 1 : -1] if key.endswith("]") else None
    return escape(f"{key} ({slice_rows[name]} rows)" if name in slice_rows else key)
