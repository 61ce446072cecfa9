"""`finetune eval`: a finished run scored on its held-out data against its base, and the CI gate on its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.common import JsonOpt, console, echo_json, fail, handles_errors
from finetune.cli.render import print_comparison
from finetune.errors import UserError


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_)


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
            "--require",
            help="Exit 1 unless a tuned figure meets a bound: 'exact_match>=0.8', 'loss<=0.5'; one slice's "
            "'exact_match[hard]>=0.8', 'loss[hard]<=1.2', 'preference_accuracy[hard]>=0.7'; the delta to the base 'exact_match.delta>0' or its 95% interval's lower end "
            "'exact_match.delta.low>0' (better beyond the noise).",
        ),
    ] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", help="Deprecated: --fail-under M=V is --require 'M>=V'.", hidden=True),
    ] = None,
    fail_if_worse: Annotated[
        bool, typer.Option("--fail-if-worse-than-base", help="Exit 1 if any tuned figure is worse than the base's.")
    ] = False,
    review_sheet: Annotated[
        Path | None,
        typer.Option("--review-sheet", help="Write a blind review sheet (FILE.csv and FILE.html) of the newest eval."),
    ] = None,
    ratings: Annotated[
        Path | None, typer.Option("--ratings", help="Read a filled review sheet back: tuned preferred over base.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Held-out loss and metrics of the tuned model against its base, side by side; a CI gate.

    Example: finetune eval runs/quickstart --require 'exact_match>=0.8' --require 'exact_match.delta.low>0'

    Blind review: finetune eval runs/quickstart --review-sheet review.csv, then --ratings review.csv once filled.
    """
    if review_sheet is not None or ratings is not None:
        from finetune.cli.judged import review

        return review(target, review_sheet, ratings, as_json)
    from finetune.summary import Requirement, gate

    if against not in (None, "base", "none"):
        raise UserError(f"--against: use base or none, not {against!r}")
    requirements = [Requirement.parse(r) for r in require or []] + [Requirement.fail_under(f) for f in fail_under or []]
    if fail_under:
        typer.echo("warning: --fail-under is deprecated: use --require 'METRIC>=VALUE'", err=True)
    from finetune.evaluate import evaluate

    against_base = None if against is None else against == "base"
    result = evaluate(target, against_base=against_base, limit=limit, out=out, require=requirements)
    failures = gate(result.summary, requirements, fail_if_worse)
    if as_json:
        echo_json({**result.to_dict(), "gate_failures": failures})
    else:
        print_comparison(console(), result.summary)
        if result.judge is not None:
            from finetune.cli.judged import print_judge

            print_judge(result.judge)
        typer.echo(f"results: {result.out_dir} (the run's own eval/summary.json is unchanged)")
    if failures:
        raise fail("\n".join(f"gate failed: {f}" for f in failures), 1)
