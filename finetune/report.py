"""report.html: one self-contained page per run (inline SVG, no scripts, no CDN) that opens offline.

Loss curves (train and held-out), learning rate, gradient norm and throughput from
metrics.jsonl; the base-vs-tuned table from eval/summary.json; the manifest's key facts.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.files import write_text_atomic
from finetune.runs import RunDir, read_summary
from finetune.summary import EvalSummary, lower_is_better

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#db2777")
# pixels: a legend row, and the width of a character at font-size 12 and at 11 (tick labels). 0.6 em is an upper
# bound for system sans-serif fonts (their mean is ~0.55 em: 6.6 px let long legend entries print over each other)
LEGEND_ROW, CHAR_WIDTH, TICK_CHAR = 14, 7.2, 6.6


def write_report(run: RunDir) -> Path:
    """Render the run's report from what is on disk; safe to call at any point of a run."""
    manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
    logs = _read_jsonl(run.metrics)
    summary = read_summary(run)
    path = run.root / "report.html"
    write_text_atomic(path, render(manifest, logs, summary))
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(logs: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) points of one logged quantity; NaN/inf kept out of the drawing, not out of the file."""
    return [(r["step"], float(r[key])) for r in logs if key in r and math.isfinite(float(r[key]))]


def render(manifest: dict[str, Any], logs: list[dict[str, Any]], summary: EvalSummary | None) -> str:
    charts = [
        line_chart("loss", {"train": series(logs, "loss"), "held-out": series(logs, "eval_loss")}),
        line_chart("learning rate", {"lr": series(logs, "learning_rate")}),
        line_chart("gradient norm", {"grad norm": series(logs, "grad_norm")}),
        line_chart("tokens / s", {"tokens/s": series(logs, "tokens_per_s")}),
    ]
    if any("rewards/margins" in r for r in logs):  # preference methods (DPO, KTO)
        charts.append(line_chart("reward margin", {"train": series(logs, "rewards/margins"),
                                                   "held-out": series(logs, "eval_rewards/margins")}))  # fmt: skip
        charts.append(line_chart("preference accuracy", {"train": series(logs, "rewards/accuracies"),
                                                         "held-out": series(logs, "eval_rewards/accuracies")}))  # fmt: skip
    if any("reward" in r for r in logs):  # GRPO
        charts += _reward_charts(logs)
    title = html.escape(f"finetune run {manifest.get('name', '')}")
    return f"""{page_head(title, RUN_CSS)}
{_facts(manifest)}
{_data_checks(manifest.get("data") or {})}
<h2>{_heading(summary)}</h2>
{_comparison(summary)}
<h2>Training</h2>
<div class="charts">{"".join(charts)}</div>
</body></html>
"""


def _reward_charts(logs: list[dict[str, Any]]) -> list[str]:
    """GRPO: the reward (each function's mean, their weighted sum, held-out), its spread, KL and completion lengths."""
    names = sorted({k.split("/")[1] for r in logs for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    rewards = {"reward (weighted sum)": series(logs, "reward"), "held-out": series(logs, "eval_reward")}
    rewards |= {name: series(logs, f"rewards/{name}/mean") for name in names}
    return [
        line_chart("reward", rewards),
        line_chart(
            "reward spread", {"std": series(logs, "reward_std"), "equal groups": series(logs, "frac_reward_zero_std")}
        ),
        line_chart("KL to the reference", {"kl": series(logs, "kl")}),
        line_chart("completion tokens", {"mean": series(logs, "completions/mean_length")}),
        line_chart("completions cut at max length (share)", {"clipped": series(logs, "completions/clipped_ratio")}),
    ]


def _facts(m: dict[str, Any]) -> str:
    lora = m.get("lora", {})
    data = m.get("data", {})
    rows = [
        ("status", m.get("status")),
        ("base model", _base_model(m.get("base_model") or {})),
        ("started / finished", f"{m.get('started') or '-'} / {m.get('finished') or '-'}"),
        ("steps", m.get("steps")),
        ("best held-out step", m.get("best_step")),  # only with in-training evaluation (train.eval_every)
        ("trainable parameters", f"{lora.get('trainable_params', 0):,} of {lora.get('total_params', 0):,}"),
        ("LoRA targets", ", ".join(lora.get("targets", []))),
        ("train / eval rows", f"{data['train_rows']} / {data.get('eval_rows') or 0}" if "train_rows" in data else None),
        ("streaming", (data.get("sample") or {}).get("note")),  # a stream's data figures are of a sample
        ("recipe sha256", m.get("recipe_sha256")),
        ("git", _git(m.get("git"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)),
    ]
    if m.get("error"):
        rows.insert(1, ("error", m["error"]))
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None
    )
    return f'<table class="facts">{body}</table>'


# --- the data checks (finetune/data/checks.py), as `finetune data` lists them ---------------------


def _data_checks(data: dict[str, Any]) -> str:
    """The findings of the data checks: kind, rows, figures, the first rows as file:row; what was dropped; per file."""
    checks = data.get("checks")
    if not checks:  # a run from before the checks, or a method whose data they do not cover
        return ""
    findings = checks.get("findings") or []
    if not findings:
        return "<h2>Data checks</h2><p>No findings (duplicates, leakage, contradictions, truncation, ...).</p>"
    rows = "".join(
        f'<tr><td>{html.escape(f["kind"].replace("_", " "))}</td><td class="n">{f["rows"]:,}</td>'
        f"<td>{html.escape(f['detail'])}</td><td>{'<br>'.join(html.escape(e) for e in f['examples'])}</td></tr>"
        for f in findings
    )
    dropped = checks.get("dropped") or {}
    note = ("<p>Dropped before training: " + ", ".join(f"{n:,} {html.escape(k)}" for k, n in dropped.items())
            + "</p>") if dropped else "<p>Nothing was dropped (<code>data.dedup</code>, <code>data.leakage</code>).</p>"  # fmt: skip
    return (
        '<h2>Data checks</h2><table class="checks"><tr><th>finding</th><th>rows</th><th>figures</th>'
        f"<th>first rows (file:row)</th></tr>{rows}</table>{note}{_per_source(checks.get('per_source') or {})}"
    )


def _per_source(per_source: dict[str, dict[str, int]]) -> str:
    if not per_source:
        return ""
    kinds = sorted({k for counts in per_source.values() for k in counts if k != "rows"})
    head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in kinds)
    body = "".join(
        f'<tr><td>{html.escape(name)}</td><td class="n">{counts.get("rows", 0):,}</td>'
        + "".join(f'<td class="n">{counts.get(k, 0):,}</td>' for k in kinds)
        + "</tr>"
        for name, counts in per_source.items()
    )
    return f'<table class="checks"><tr><th>source</th><th>rows</th>{head}</tr>{body}</table>'


def _base_model(base: dict[str, Any]) -> str | None:
    return None if not base.get("id") else f"{base['id']} @ {base.get('commit') or 'local'}"


def _git(state: dict[str, Any] | None) -> str | None:
    """The experiment repository's commit as a reader wants it: `abc123... (uncommitted changes)`."""
    if not state or not state.get("commit"):
        return None
    return state["commit"] + (" (uncommitted changes)" if state.get("dirty") else "")


def _heading(summary: EvalSummary | None) -> str:
    if summary is None or summary.preference is None:
        return "Held-out: base vs tuned"
    return "Held-out: tuned vs its reference" + (
        " (the base)" if summary.preference.reference_is_base else " (the parent run)"
    )


def _comparison(summary: EvalSummary | None) -> str:
    if summary is None:
        return "<p>No held-out evaluation (set <code>data.eval</code>).</p>"
    if summary.preference is not None:
        return _preference_comparison(summary)
    table = _rows_table(summary, "metric")
    parts = [
        f"{table}<p>{summary.examples} held-out examples"
        + ("; delta [95% paired bootstrap interval], sign test p" if summary.intervals else "")
        + ".</p>"
    ]
    if summary.slices:
        rows = "".join(f"<h3>slice {html.escape(name)} ({part.examples} rows"
                       f"{'' if part.loss_rows is None else f'; loss on {part.loss_rows}'})</h3>"
                       f"{_rows_table(part, 'metric')}" for name, part in summary.slices.items())  # fmt: skip
        parts.append(rows)
    if summary.cost:
        head = "<tr><th>per answer (mean / p95)</th>" + "".join(f"<th>{m}</th>" for m in summary.cost) + "</tr>"
        body = "".join(
            f"<tr><td>{figure}</td>" + "".join(f"<td>{c[figure]['mean']:.3g} / {c[figure]['p95']:.3g}</td>"
                                               for c in summary.cost.values()) + "</tr>"
            for figure in ("tokens", "latency_s", "tokens_per_s")
        )  # fmt: skip
        parts.append(f"<h3>cost</h3><table>{head}{body}</table><p>Latency is each answer's batch's wall time.</p>")
    return "".join(parts)


def _rows_table(summary: EvalSummary, first: str) -> str:
    """Base, tuned and the delta (with its interval and sign test where computed), the delta coloured."""
    rows = []
    for row in summary.rows():
        if row.base is None:
            rows.append(
                f"<tr><td>{html.escape(row.metric)}</td><td>-</td><td>{row.tuned:.4f}</td><td></td><td></td></tr>"
            )
            continue
        css = {True: "better", False: "worse", None: ""}[row.better]
        p = "" if row.sign_p is None else f"{row.sign_p:.3g}"
        delta = row.delta_text(4 if row.low is None else 2)
        rows.append(f'<tr><td>{html.escape(row.metric)}</td><td>{row.base:.4f}</td><td>{row.tuned:.4f}</td>'
                    f'<td class="{css}">{delta}</td><td>{p}</td></tr>')  # fmt: skip
    head = f"<tr><th>{first}</th><th>base</th><th>tuned</th><th>delta</th><th>sign test p</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _preference_comparison(summary: EvalSummary) -> str:
    """A DPO, KTO or GRPO run: base, reference and tuned side by side, the delta coloured against the reference
    (what this stage changed), as `finetune eval` shows it."""
    p = summary.preference
    base = {} if summary.base is None else {**summary.base.metrics, **_logps(summary.base.logps)}
    reference, tuned = (
        {**p.reference.metrics, **_logps(p.reference.logps)},
        {**summary.tuned.metrics, **_logps(summary.tuned.logps)},
    )
    rows = []
    for name, value in tuned.items():
        ref = reference.get(name)
        b = "-" if name not in base else f"{base[name]:.4f}"
        if ref is None:
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{b}</td><td>-</td><td>{value:.4f}</td><td></td></tr>")
            continue
        better = None if value == ref else (value < ref) == lower_is_better(name)
        css = {True: "better", False: "worse", None: ""}[better] if not name.startswith("logp ") else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{b}</td><td>{ref:.4f}</td><td>{value:.4f}</td>"
                    f'<td class="{css}">{value - ref:+.4f}</td></tr>')  # fmt: skip
    which = "the base" if p.reference_is_base else "the parent run"
    head = f"<tr><th>metric</th><th>base</th><th>reference ({which})</th><th>tuned</th><th>vs reference</th></tr>"
    counted = {"dpo": f"{p.pairs} held-out pairs, ", "kto": f"{p.pairs} held-out rows, "}.get(p.method, "")
    parts = [f"<table>{head}{''.join(rows)}</table><p>{counted}{summary.examples} held-out prompts.</p>"]
    parts += [
        f"<h3>slice {html.escape(name)}</h3>{_preference_comparison(part)}" for name, part in summary.slices.items()
    ]
    return "".join(parts)


def _logps(logps: dict[str, float] | None) -> dict[str, float]:
    return {f"logp {k}": v for k, v in (logps or {}).items()}


PAGE_CSS = """body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1360px; color: #111; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }"""
RUN_CSS = """td:first-child, th:first-child, .facts td { text-align: left; }
.better { color: #16a34a; } .worse { color: #dc2626; } code { font-size: 0.92em; }
.checks td, .checks th { text-align: left; vertical-align: top; } .checks td.n { text-align: right; }"""


def page_head(title: str, css: str = "") -> str:
    """The start of a self-contained page (no script, no external file), up to its <h1>: one look for every page."""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>\n{PAGE_CSS}\n{css}\n</style></head><body>\n<h1>{title}</h1>"
    )


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 240) -> str:
    """An SVG line chart with axes and a legend; a series with one point is drawn as a dot."""
    points = [p for pts in lines.values() for p in pts]
    if not points:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20">{html.escape(title)}: no data</text></svg>'
    names = [n for n, pts in lines.items() if pts]
    frame = Frame(title, [p[0] for p in points], [p[1] for p in points], width, height, legend=names)
    parts = frame.axes()
    for i, (name, pts) in enumerate((n, p) for n, p in lines.items() if p):
        color = COLORS[i % len(COLORS)]
        parts += frame.line(pts, color, dots=len(pts) < 30)
        parts.append(frame.legend(i, name, color))
    return frame.svg(parts)


class Frame:
    """The axes of one SVG chart: data-to-pixel scales, gridlines, tick labels, title and legend.

    `log_x` spaces x by log2 (LoRA ranks 1..64 evenly); `right` leaves room for a second y axis.
    """

    def __init__(
        self, title: str, xs: list[float], ys: list[float], width: int = 420, height: int = 240,
        log_x: bool = False, right: int = 12, legend: list[str] | tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.title, self.width, self.height, self.log_x = title, width, height, log_x
        self.left, self.right, self.bottom = 56, right, 28
        self.slots = self._legend_slots(list(legend))
        rows = 1 + max((y for _, y in self.slots), default=-1)
        self.top = 28 + LEGEND_ROW * rows  # the legend sits between the title and the plot, never over a line
        xs = [self._x(x) for x in xs]
        self.x0, self.x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        self.y0, self.y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def _x(self, x: float) -> float:
        return math.log2(x) if self.log_x else x

    def sx(self, x: float) -> float:
        return self.left + (self._x(x) - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def sy(self, y: float, y0: float | None = None, y1: float | None = None) -> float:
        """y in pixels; `y0`, `y1` give another scale (a second axis) over the same height."""
        y0, y1 = (self.y0, self.y1) if y0 is None else (y0, y1)
        return self.height - self.bottom - (y - y0) / (y1 - y0) * (self.height - self.top - self.bottom)

    def axes(self, x_ticks: list[tuple[float, str]] | None = None) -> list[str]:
        """Title, three y gridlines with labels, and x labels (the ends, or the ticks given)."""
        parts = [f'<text x="{self.left}" y="16" font-weight="bold">{html.escape(self.title)}</text>']
        ys = [self.y0, (self.y0 + self.y1) / 2, self.y1]
        for y, label in zip(ys, tick_labels(ys), strict=True):
            parts.append(
                f'<text x="{self.left - 6}" y="{self.sy(y) + 4:.1f}" text-anchor="end" font-size="11">{label}</text>'
            )
            parts.append(
                f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{self.sy(y):.1f}" y2="{self.sy(y):.1f}" stroke="#eee"/>'
            )
        if x_ticks is None:  # the two ends, in data units
            xs = [2**x if self.log_x else x for x in (self.x0, self.x1)]
            x_ticks = list(zip(xs, tick_labels(xs, lambda v, d: f"{v:.{max(d, 6)}g}"), strict=True))
        shown: list[tuple[float, str]] = []
        for x, label in x_ticks:
            if shown and abs(self.sx(x) - self.sx(shown[-1][0])) < (len(label) + len(shown[-1][1])) * TICK_CHAR / 2 + 6:
                continue  # it would print over the label before it: leave it out
            shown.append((x, label))
            parts.append(
                f'<text x="{self.sx(x):.1f}" y="{self.height - 10}" text-anchor="middle" font-size="11">{html.escape(label)}</text>'
            )
        return parts

    def line(self, pts: list[tuple[float, float]], color: str, dots: bool = True, dashed: bool = False,
             scale: tuple[float, float] | None = None) -> list[str]:  # fmt: skip
        """A polyline (and dots) through the points; `scale` = (y0, y1) of a second axis."""
        y0, y1 = scale or (None, None)
        coords = " ".join(f"{self.sx(x):.1f},{self.sy(y, y0, y1):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        parts = [f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{coords}"/>']
        if dots:
            parts += [
                f'<circle cx="{self.sx(x):.1f}" cy="{self.sy(y, y0, y1):.1f}" r="2.5" fill="{color}"/>' for x, y in pts
            ]
        return parts

    def _legend_slots(self, names: list[str]) -> list[tuple[float, int]]:
        """(x, row) of each legend entry, left to right in rows as wide as the chart."""
        slots, x, row = [], float(self.left), 0
        for name in names:
            width = len(name) * CHAR_WIDTH
            if x > self.left and x + width > self.width - 4:
                x, row = float(self.left), row + 1
            slots.append((x, row))
            x += width + 14
        return slots

    def legend(self, i: int, name: str, color: str) -> str:
        """Entry `i` of the legend given to the frame (its slot above the plot)."""
        x, row = self.slots[i] if i < len(self.slots) else (self.left, 0)
        return f'<text x="{x:.1f}" y="{30 + LEGEND_ROW * row}" fill="{color}" font-size="12">{html.escape(name)}</text>'

    def svg(self, parts: list[str]) -> str:
        body = "".join(parts)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" role="img" '
            f'font-family="system-ui, sans-serif">{body}</svg>'
        )


def _tick(y: float, digits: int = 3) -> str:
    return f"{y / 1000:.{digits}g}k" if abs(y) >= 1000 else f"{y:.{digits}g}"


def tick_labels(values: list[float], label: Callable[[float, int], str] = _tick) -> list[str]:
    """Labels for axis values with the fewest significant digits (3 at least) that keep distinct values distinct:
    6.0, 6.005, 6.01 read 6, 6.005, 6.01, never 6 / 6.01 / 6.01."""
    distinct = len(set(values))
    for digits in range(3, 12):
        labels = [label(v, digits) for v in values]
        if len(set(labels)) == distinct:
            break
    return labels
