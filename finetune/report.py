"""report.html: one self-contained page per run (inline SVG, no scripts, no CDN) that opens offline.

Loss curves (train and held-out), learning rate, gradient norm and throughput from
metrics.jsonl; the base-vs-tuned table from eval/summary.json; the manifest's key facts.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from finetune.runs import RunDir, read_summary, write_text_atomic
from finetune.summary import EvalSummary

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


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
    title = html.escape(f"finetune run {manifest.get('name', '')}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1360px; color: #111; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child, .facts td {{ text-align: left; }} .charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.better {{ color: #16a34a; }} .worse {{ color: #dc2626; }} code {{ font-size: 0.92em; }}
</style></head><body>
<h1>{title}</h1>
{_facts(manifest)}
<h2>Held-out: base vs tuned</h2>
{_comparison(summary)}
<h2>Training</h2>
<div class="charts">{"".join(charts)}</div>
</body></html>
"""


def _facts(m: dict[str, Any]) -> str:
    lora = m.get("lora", {})
    data = m.get("data", {})
    rows = [
        ("status", m.get("status")),
        ("base model", f"{m.get('base_model', {}).get('id')} @ {m.get('base_model', {}).get('commit') or 'local'}"),
        ("started / finished", f"{m.get('started')} / {m.get('finished') or '-'}"),
        ("steps", m.get("steps")),
        ("best held-out step", m.get("best_step")),
        ("trainable parameters", f"{lora.get('trainable_params', 0):,} of {lora.get('total_params', 0):,}"),
        ("LoRA targets", ", ".join(lora.get("targets", []))),
        ("train / eval rows", f"{data.get('train_rows')} / {data.get('eval_rows')}"),
        ("recipe sha256", m.get("recipe_sha256")),
        ("git", json.dumps(m.get("git"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)),
    ]
    if m.get("error"):
        rows.insert(1, ("error", m["error"]))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>'


def _comparison(summary: EvalSummary | None) -> str:
    if summary is None:
        return "<p>No held-out evaluation (set <code>data.eval</code>).</p>"
    rows = []
    for row in summary.rows():
        if row.base is None:
            rows.append(f"<tr><td>{row.metric}</td><td>-</td><td>{row.tuned:.4f}</td><td></td></tr>")
            continue
        css = {True: "better", False: "worse", None: ""}[row.better]
        rows.append(
            f'<tr><td>{row.metric}</td><td>{row.base:.4f}</td><td>{row.tuned:.4f}</td><td class="{css}">{row.delta:+.4f}</td></tr>'
        )
    head = "<tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>"
    if summary.preference is not None:  # a preference run: its reference (the parent run) too
        reference = summary.preference.reference
        cells = "".join(f"<tr><td>{k}</td><td>{v:.4f}</td></tr>" for k, v in reference.metrics.items())
        cells += "".join(f"<tr><td>logp {k}</td><td>{v:.3f}</td></tr>" for k, v in (reference.logps or {}).items())
        rows.append(f'<tr><td colspan="4"><b>reference</b> (the parent run)<table>{cells}</table></td></tr>')
    return f"<table>{head}{''.join(rows)}</table><p>{summary.examples} held-out examples.</p>"


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 240) -> str:
    """An SVG line chart with axes and a legend; a series with one point is drawn as a dot."""
    points = [p for pts in lines.values() for p in pts]
    if not points:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20">{html.escape(title)}: no data</text></svg>'
    left, right, top, bottom = 56, 12, 28, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<text x="{left}" y="16" font-weight="bold">{html.escape(title)}</text>']
    for y in (y0, (y0 + y1) / 2, y1):
        label = f"{y / 1000:.3g}k" if abs(y) >= 1000 else f"{y:.3g}"
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    for x in (x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - 10}" text-anchor="middle" font-size="11">{x:g}</text>')
    for i, (name, pts) in enumerate((n, p) for n, p in lines.items() if p):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        parts += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts if len(pts) < 30
        ]
        parts.append(
            f'<text x="{width - right}" y="{16 + 14 * i}" text-anchor="end" fill="{color}" font-size="12">{html.escape(name)}</text>'
        )
    body = "".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">{body}</svg>'
