"""Tables and lines that two commands print alike: the held-out comparison (`train`, `eval`) and the merge
check (`merge`, `export`). Each reads the typed result, so a renamed field fails in the tests, not at a user's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from finetune.summary import EvalSummary


def print_comparison(console: Any, summary: EvalSummary) -> None:
    """Tuned against base (and reference, for a continued run) on held-out data, then the harness's figures."""
    if summary.preference is not None:
        console.print(preference_table(summary))
        if summary.slices:
            console.print(preference_slices_table(summary))
        return
    console.print(comparison_table(summary))
    if summary.slices:
        console.print(slices_table(summary))
    if summary.cost:
        console.print(cost_table(summary.cost))
    if summary.harness:
        console.print(harness_table(summary.harness))


def harness_table(harness: dict[str, dict[str, dict[str, float]]]) -> Table:
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


def comparison_table(summary: EvalSummary) -> Table:
    """Held-out figures for base and tuned side by side, with the difference and per-example wins/losses."""
    from rich.table import Table

    title = f"held-out ({summary.examples} examples; delta [95% paired bootstrap interval], sign test p)"
    table = Table(title=title if summary.intervals else f"held-out ({summary.examples} examples)", title_justify="left")
    for column in ("metric", "base", "tuned", "delta", "wins/losses/ties", "p"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in summary.rows():
        digits = 2 if row.metric == "perplexity" else 4
        base = "-" if row.base is None else f"{row.base:.{digits}f}"
        p = "" if row.sign_p is None else f"{row.sign_p:.3g}"
        table.add_row(row.metric, base, f"{row.tuned:.{digits}f}", row.delta_text(digits if row.low is None else 2),
                      row.record, p)  # fmt: skip
    return table


def slices_table(summary: EvalSummary) -> Table:
    """Every figure per slice (loss and perplexity too, token-weighted over the slice's rows), with the slice's
    rows, delta and interval (the same test, fewer rows). `rows` counts the prompts; where the loss scored a
    different number of tokenized rows (some cut by max_seq_length, or eval.limit), it says so: `5 (loss 6)`."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="per slice", title_justify="left")
    for column in ("slice", "rows", "metric", "base", "tuned", "delta", "wins/losses/ties"):
        table.add_column(column, justify="left" if column in ("slice", "metric") else "right")
    for name, part in summary.slices.items():
        rows = str(part.examples) + ("" if part.loss_rows is None else f" (loss {part.loss_rows})")
        for row in part.rows():
            digits = 2 if row.metric == "perplexity" else 4
            base = "-" if row.base is None else f"{row.base:.{digits}f}"
            delta = row.delta_text(digits if row.low is None else 2)
            table.add_row(escape(name), rows, row.metric, base, f"{row.tuned:.{digits}f}", delta, row.record)
    return table


def cost_table(cost: dict[str, dict[str, dict[str, float]]]) -> Table:
    """Per answer: generated tokens, latency (its batch's wall time) and tokens/s, as mean and p95, per model."""
    from rich.table import Table

    table = Table(title="cost per answer (mean / p95; latency is the batch's wall time)", title_justify="left")
    table.add_column("figure")
    for model in cost:
        table.add_column(model, justify="right")
    for figure, digits in (("tokens", 1), ("latency_s", 3), ("tokens_per_s", 1)):
        cells = [f"{c[figure]['mean']:.{digits}f} / {c[figure]['p95']:.{digits}f}" for c in cost.values()]
        table.add_row(figure, *cells)
    return table


def preference_table(summary: EvalSummary) -> Table:
    """A DPO, KTO or GRPO run's held-out figures: base, reference (the parent run) and tuned side by side.

    A metric is named as in the JSON and as `eval --require` takes it (`module:function` for a user's).
    """
    from rich.table import Table

    p = summary.preference
    if p is None:  # an SFT summary has no reference
        return comparison_table(summary)
    tuned, reference = summary.tuned, p.reference
    models = {name: s for name, s in (("base", summary.base), ("reference", reference), ("tuned", tuned)) if s}
    rows = {"dpo": f"{p.pairs} pairs, ", "kto": f"{p.pairs} rows, "}.get(p.method, "")
    title = f"held-out: {rows}{summary.examples} prompts" + (" (reference = base)" if p.reference_is_base else "")
    table = Table(title=title, title_justify="left")
    for column in ("metric", *models, "vs reference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in tuned.metrics:
        cells = [f"{s.metrics[key]:.4f}" for s in models.values()]
        table.add_row(key, *cells, f"{tuned.metrics[key] - reference.metrics[key]:+.4f}")
    if all(s.logps for s in models.values()):  # preference methods score both answers; GRPO has none
        for side in ("chosen", "rejected"):
            cells = [f"{s.logps[side]:.3f}" for s in models.values()]
            table.add_row(f"logp {side}", *cells, f"{tuned.logps[side] - reference.logps[side]:+.3f}")
    return table


def preference_slices_table(summary: EvalSummary) -> Table:
    """A DPO, KTO or GRPO run's figures per slice: the preference metrics recomputed on the slice's pairs (KTO:
    rows), the rewards and generation metrics on its prompts, base, reference and tuned side by side."""
    from rich.markup import escape
    from rich.table import Table

    p = summary.preference
    counted = {"dpo": "pairs", "kto": "rows"}.get(p.method if p else "", "")
    table = Table(title="per slice", title_justify="left")
    columns = ("slice", *((counted,) if counted else ()), "prompts", "metric", "base", "reference", "tuned",
               "vs reference")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("slice", "metric") else "right")
    for name, part in summary.slices.items():
        q = part.preference
        if q is None:
            continue
        count = (str(q.pairs),) if counted else ()
        for key, tuned in part.tuned.metrics.items():
            cells = [f"{s.metrics[key]:.4f}" if s is not None and key in s.metrics else "-"
                     for s in (part.base, q.reference)]  # fmt: skip
            versus = f"{tuned - q.reference.metrics[key]:+.4f}" if key in q.reference.metrics else ""
            table.add_row(escape(name), *count, str(part.examples), key, *cells, f"{tuned:.4f}", versus)
    return table


def check_line(c: dict[str, Any]) -> str:
    """merge_check.json in one line: how far the merged logits are from base + adapter, and the verdict."""
    source = "eval/examples.jsonl" if c["prompts_from"].endswith("examples.jsonl") else c["prompts_from"]
    return (
        f"check: {c['prompts']} prompts ({c['tokens']} tokens, {source}): max |merged - unmerged| logit "
        f"{c['max_abs_diff']:.3g} (relative {c['max_rel_diff']:.3g}) <= tolerance {c['tolerance']:.3g}: passed; "
        f"the adapter moves logits by up to {c['adapter_effect']:.3g}; "
        f"greedy tokens agree at {c['argmax_agreement']:.1%} of positions"
    )
