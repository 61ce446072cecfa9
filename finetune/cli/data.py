"""`finetune data`: dataset statistics and rendered examples with the trained tokens marked (tokenizer only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, cast

import typer

from finetune.cli.common import JsonOpt, RecipeArg, SetOpt, console, echo_json, fail, handles_errors

if TYPE_CHECKING:
    from rich.table import Table

    from finetune.data.inspect import DataResult, Example, PairExample, PromptExample
    from finetune.data.preference import PreferenceStats
    from finetune.data.prepare import DataStats, SourceStats
    from finetune.data.prompts import PromptStats


def register(app: typer.Typer) -> None:
    app.command()(data)


@handles_errors
def data(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    show: Annotated[int, typer.Option("--show", help="Render this many examples with trained tokens marked.")] = 3,
    color: Annotated[bool, typer.Option("--color/--no-color", help="Colour trained text (default: when a terminal).")]
    | None = None,
    as_json: JsonOpt = False,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on", help="Exit 1 when any of these findings is present: duplicates,leakage,contradictions."
        ),
    ] = None,
) -> None:
    """Dataset statistics, data-check findings and rendered examples with the trained tokens marked (no weights).

    Example: finetune data recipes/quickstart.yaml --show 5 --fail-on duplicates,leakage
    """
    from finetune.data.inspect import inspect_data
    from finetune.recipe.load import load_recipe

    wanted = _fail_on_kinds(fail_on)  # a misspelled kind exits 2 before any data is read
    loaded = load_recipe(recipe, overrides or [])
    result = inspect_data(loaded, show)
    if as_json:
        echo_json(result.to_dict(), ascii_only=False)
    else:
        print_data(result, color)
        _print_ranks(loaded)
    _fail_on_findings(getattr(result.stats, "checks", None) or {}, wanted)


def _print_ranks(recipe) -> None:
    """With per-layer ranks, alphas or blocks: which modules get which (as `finetune plan` prints it too)."""
    lora = recipe.lora
    if lora.rank_pattern or lora.alpha_pattern or lora.layers is not None:
        from finetune.plan import adapter_ranks

        for line in adapter_ranks(recipe):
            console().print(f"adapters: {line}")


def _fail_on_kinds(fail_on: str | None) -> set[str]:
    from finetune.data.checks import FAIL_ON

    wanted = {k.strip() for k in (fail_on or "").split(",") if k.strip()}
    if wanted - set(FAIL_ON):
        raise fail(
            f"--fail-on: unknown {', '.join(sorted(wanted - set(FAIL_ON)))}; choose from {', '.join(FAIL_ON)}", 2
        )
    return wanted


def _fail_on_findings(checks: dict, wanted: set[str]) -> None:
    """Exit 1 listing the findings of the kinds named (near-duplicates count as duplicates)."""
    hits = [f for f in checks.get("findings", []) if f["kind"].removeprefix("near_") in wanted]
    for f in hits:
        typer.echo(f"data check failed: {f['rows']} {f['kind']} ({f['detail']}): {'; '.join(f['examples'])}", err=True)
    if hits:
        raise typer.Exit(1)


def print_data(result: DataResult, color: bool | None) -> None:
    """The statistics table and examples of SFT rows, preference pairs or GRPO prompts."""
    from finetune.data.preference import PreferenceStats
    from finetune.data.prompts import PromptStats

    if isinstance(result.stats, PreferenceStats):
        _print_preference_data(result.stats, cast("list[PairExample]", result.examples))
    elif isinstance(result.stats, PromptStats):
        _print_prompt_data(result.stats, cast("list[PromptExample]", result.examples))
    else:
        _print_sft_data(result, cast("list[Example]", result.examples), color)


def _skipped(source: SourceStats) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in source.skipped_by_reason.items())
    return f"{source.skipped} skipped" + (f": {reasons}" if reasons else "")


def _print_sft_data(result: DataResult, examples: list[Example], color: bool | None) -> None:
    from rich.table import Table
    from rich.text import Text

    s = cast("DataStats", result.stats)
    out = console(markup=False, no_color=color is False, force_terminal=color or None)
    table = Table(title="data", title_justify="left", show_header=False)
    sample = getattr(s, "sample", None)  # a stream's figures are of its first rows (data/stream.py)
    if sample:
        table.add_row("streaming", sample["note"])
        for share in sample["sources"] if len(sample["sources"]) > 1 else []:
            table.add_row(Text(f"sample {share['path']}"), f"{share['rows']} rows ({share['share']:.1%} of the sample)")
    for source in s.sources:
        table.add_row(f"source {source.path}", f"{source.rows} rows ({_skipped(source)}), {source.format}")
    p = s.length_percentiles
    trained_share = s.trained_tokens / max(s.train_tokens, 1)
    for label, value in (
        ("train / eval rows", f"{s.train_rows} / {s.eval_rows}"),
        ("duplicates train-eval", s.duplicates_train_eval),
        ("tokens per row (p50 p95 p99 max)", f"{p['p50']} {p['p95']} {p['p99']} {p['max']}"),
        ("max_seq_length", f"{s.max_seq_length} (suggested: {s.suggested_max_seq_length}, the p99 rounded up)"),
        ("rows over max_seq_length", f"{s.over_max_seq_length} ({s.truncated} truncated, {s.dropped} dropped)"),
        ("tokens trained / total", f"{s.trained_tokens:,} / {s.train_tokens:,} ({trained_share:.1%})"),
    ):
        table.add_row(label, str(value))
    for m in (s.mix or {}).get("sources", []):
        table.add_row(Text(f"mix {m['path']}"), Text(f"weight {m['weight']:.2f}: {m['effective_rows']:,} rows per epoch "
                      f"from {m['rows']:,} ({m['times_seen']:g}x each), {m['tokens']:,} tokens ({s.mix['stop']})"))  # fmt: skip
    _add_findings(table, s.checks)
    out.print(table)
    peak = max((n for _, _, n in result.histogram), default=1)
    out.print("token length histogram (training rows, before truncation)")
    for low, high, n in result.histogram:
        out.print(f"  {low:>6}-{high:<6} {'#' * max(1 if n else 0, round(40 * n / peak)):<40} {n}")
    marked = color is False or (color is None and not out.is_terminal)
    legend = "[[trained text]] is in double brackets" if marked else "trained text is green"
    for e in examples:
        out.print(f"\n{e.where}: {e.tokens} tokens, {e.trained_tokens} trained ({legend})")
        text = Text()
        for piece, trained in e.pieces:
            if marked:
                text.append(f"[[{piece}]]" if trained else piece)
            else:
                text.append(piece, style="bold green" if trained else "dim")
        out.print(text)


def _add_findings(table: Table, checks: dict | None) -> None:
    """One row per data-check finding: kind, rows, figures, the first rows as file:row (as Text: a finding
    quoting `[INST]` is not rich markup)."""
    from rich.text import Text

    for f in (checks or {}).get("findings", []):
        first = f"; first: {', '.join(f['examples'])}" if f["examples"] else ""
        table.add_row(Text(f"check: {f['kind']}"), Text(f"{f['rows']} rows ({f['detail']}){first}"))


def _print_preference_data(s: PreferenceStats, examples: list[PairExample]) -> None:
    """Preference rows: counts, token lengths per side, truncation, and examples with both answers."""
    from rich.markup import escape
    from rich.table import Table

    out = console()
    table = Table(title="preference data", title_justify="left", show_header=False)
    unit = "pairs" if s.paired else "rows"
    table.add_row(f"train / held-out {unit}", f"{s.train_rows} / {s.eval_rows}")
    if not s.paired:
        table.add_row("desirable / undesirable", f"{s.desirable} / {s.undesirable}")
    for side, q in s.lengths.items():
        table.add_row(f"{side} tokens p50 / p95 / max", f"{q['p50']} / {q['p95']} / {q['max']}")
    table.add_row("max_seq_length", f"{s.max_seq_length} (suggested: {s.suggested_max_seq_length})")
    table.add_row(f"{unit} truncated", str(s.truncated))
    table.add_row("pairs truncated until chosen == rejected (dropped)", str(s.truncated_identical))
    table.add_row(f"{unit} dropped", str(s.dropped))
    table.add_row("duplicates train/held-out", str(s.duplicates_train_eval))
    _add_findings(table, s.checks)
    out.print(table)
    for e in examples:
        t = e.tokens
        out.print(f"\n{e.where}: prompt {t.prompt} tokens, chosen {t.chosen}, rejected {t.rejected}")
        out.print(f"[dim]{escape(e.prompt)}[/dim]")
        out.print(f"  chosen:   [bold green]{escape(repr(e.chosen))}[/bold green]")
        out.print(f"  rejected: [bold red]{escape(repr(e.rejected))}[/bold red]")


def _print_prompt_data(s: PromptStats, examples: list[PromptExample]) -> None:
    """GRPO prompts: counts, token lengths, what was dropped, and examples with the reference the rewards get."""
    from rich.markup import escape
    from rich.table import Table

    out = console()
    table = Table(title="prompts (grpo)", title_justify="left", show_header=False)
    table.add_row("train / held-out prompts", f"{s.train_rows} / {s.eval_rows}")
    for label, q in (("prompt", s.prompt_lengths), ("reference", s.reference_lengths)):
        table.add_row(f"{label} tokens p50 / p95 / max", f"{q['p50']} / {q['p95']} / {q['max']}")
    table.add_row("longest prompt + max_completion_length", str(s.max_seq_length))
    table.add_row("prompts dropped (over max_seq_length)", str(s.dropped))
    table.add_row("duplicates train/held-out", str(s.duplicates_train_eval))
    _add_findings(table, s.checks)
    out.print(table)
    for e in examples:
        out.print(f"\n{e.where}: prompt {e.tokens} tokens")
        out.print(f"[dim]{escape(e.prompt)}[/dim]")
        out.print(f"  reference: [bold green]{escape(repr(e.reference))}[/bold green]")
