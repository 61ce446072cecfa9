"""`finetune eval`'s human and LLM judgements: the blind review sheet, its ratings, and the judge's table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from finetune.cli.common import console, echo_json

LISTED = 5  # unscored or unparsed replies quoted under the judge's table; judge.json has them all


def review(target: Path, sheet: Path | None, ratings: Path | None, as_json: bool) -> None:
    """--review-sheet FILE writes a blind sheet; --ratings FILE reads a filled one back (no model loads)."""
    from finetune.errors import UserError
    from finetune.recipe.load import load_recipe
    from finetune.review_sheet import read_ratings, write_sheet
    from finetune.runs import RunDir, open_run

    if sheet is not None and ratings is not None:
        raise UserError("--review-sheet and --ratings: one at a time (write a sheet, have it filled, then read it)")
    run = RunDir(open_run(target).root)
    if sheet is not None:
        written = write_sheet(run.eval, sheet, load_recipe(run.recipe).seed)
        if as_json:
            echo_json(written.to_dict())
            return
        slices = f", slices {written.slices}" if written.slices else ""
        typer.echo(f"review sheet: {written.csv} and {written.html} ({written.items} items{slices})")
        typer.echo(f"key (which answer is the tuned model's; keep it from the raters): {written.key}")
        typer.echo(f"answers from: {written.examples}")
        return
    result = read_ratings(run.eval, ratings)  # type: ignore[arg-type]
    if as_json:
        echo_json(result.to_dict())
        return
    console().print(preference_table(f"blind review of sheet {result.sheet}", result.overall, result.slices))
    typer.echo(f"recorded: {result.record}")


def preference_table(title: str, overall: dict[str, Any], slices: dict[str, dict[str, Any]]) -> Any:
    """Tuned preferred over base: wins, losses, ties, unrated, win rate with its Wilson 95% interval."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption="win rate = wins / (wins + losses), Wilson 95% interval")
    for column in ("slice", "tuned wins", "base wins", "ties", "unrated", "win rate [95%]"):
        table.add_column(column, justify="left" if column == "slice" else "right")
    for name, t in {"all": overall, **slices}.items():
        table.add_row(name, str(t["wins"]), str(t["losses"]), str(t["ties"]), str(t["unrated"]), rate(t))
    return table


def rate(t: dict[str, Any]) -> str:
    if t["win_rate"] is None:
        return "-"
    low, high = t["interval"]
    return f"{t['win_rate']:.2f} [{low:.2f}, {high:.2f}]"


def print_judge(report: dict[str, Any]) -> None:
    """The LLM judge's figures under the held-out table: mean scores, or the pairwise win rate and position picks."""
    out = console()
    title = f"LLM judge {report['model']} at {report['url']}"
    requests = report["requests"]
    sent = f"requests: {requests['sent']} sent, {requests['cached']} from RUN/eval/judge-cache/"
    if report["mode"] == "pairwise":
        out.print(preference_table(title + " (pairwise)", report["preference"], report.get("slices", {})))
        p = report["position"]
        share = "-" if p["A_share"] is None else "{:.2f} [{:.2f}, {:.2f}]".format(p["A_share"], *p["A_share_interval"])
        typer.echo(f"position picks: A {p['A']}, B {p['B']}, tie {p['tie']} (A share {share}; 0.50: no position bias)")
        _listed(report["unparsed"], "unparsed", lambda u: f"row {u['row']}", sent)
        return
    from rich.table import Table

    low, high = report["scale"]
    table = Table(title=f"{title} (score {low}-{high})", title_justify="left")
    for column in ("model", "mean score", "scored", "unscored"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, m in report["models"].items():
        mean = "-" if m["mean"] is None else f"{m['mean']:.2f}"
        table.add_row(model, mean, str(m["scored"]), str(m["unscored"]))
    out.print(table)
    _listed(report["unscored"], "unscored", lambda u: f"row {u['row']} ({u['model']})", sent)


def _listed(replies: list[dict[str, Any]], what: str, where: Callable[[dict[str, Any]], str], sent: str) -> None:
    """The first replies the judge gave that were not a verdict, by row, then the request count."""
    for u in replies[:LISTED]:
        typer.echo(f"{what}: {where(u)}: {u['reply']!r}")
    more = len(replies) - LISTED
    typer.echo((f"... and {more} more {what} (judge.json lists them); " if more > 0 else "") + sent)
