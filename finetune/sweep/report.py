"""sweep.html: the metric against each swept key, drawn offline like report.html (inline SVG, no scripts).

For a lora.rank sweep: held-out loss and the metric against rank (log scale), the trainable
parameters on a second axis, and the rank where doubling stops paying marked: the smallest rank
that no larger rank beats by more than the sweep's `doubling_margin`. Points with several seeds
are drawn at their mean with a bar of ± one standard deviation.
"""

from __future__ import annotations

import html
import json
import statistics
from itertools import groupby
from typing import Any

from finetune.report import COLORS, Frame, page_head, tick_labels

RANK = "lora.rank"
PARAMS_COLOR = "#6b7280"
KNEE_ROW = 13  # pixels between the knee labels of two groups


def knees(trials: list[dict[str, Any]], keys: list[str], metric: str, direction: str, margin: float) -> list[dict]:
    """Per combination of the other keys tried at two ranks or more: the smallest rank that no larger rank beats
    by more than `margin`."""
    if RANK not in keys:
        return []
    sign = 1.0 if direction == "maximize" else -1.0
    out = []
    for group, rows in _groups(trials, keys, RANK):
        points = _points(rows, RANK, lambda t: t["metric"])
        if len(points) < 2:  # one rank in this series (a search's lone point): nothing to say about doubling it
            continue
        for i, (rank, value, _) in enumerate(points):
            larger = [v for _, v, _ in points[i + 1 :]]
            if all(sign * (v - value) <= margin for v in larger):  # the largest rank always passes: no knee
                best = max(larger, key=lambda v: sign * v) if larger else None
                out.append({"group": group, "rank": rank, "metric": value, "best_larger": best, "margin": margin,
                            "still_paying": not larger})  # fmt: skip
                break
    return out


def _groups(trials: list[dict[str, Any]], keys: list[str], key: str) -> list[tuple[dict[str, Any], list[dict]]]:
    """Completed trials split by the values of the other swept keys (one line each in a chart)."""
    others = [k for k in keys if k != key]
    done = [t for t in trials if t["status"] == "completed" and t["metric"] is not None]

    def label(t: dict) -> str:
        return json.dumps([t["values"].get(k) for k in others])

    def order(t: dict) -> list[tuple[int, Any]]:  # numbers by value (rank 2 before 16), anything else by its text
        values = [t["values"].get(k) for k in others]
        return [
            (0, v) if isinstance(v, int | float) and not isinstance(v, bool) else (1, json.dumps(v)) for v in values
        ]

    done.sort(key=order)
    return [(dict(zip(others, json.loads(g), strict=True)), list(rows)) for g, rows in groupby(done, key=label)]


def _points(rows: list[dict], key: str, value: Any) -> list[tuple[Any, float, float | None]]:
    """(x, mean, std) per value of `key`; several trials at one x (seeds, or a search) are averaged."""
    by_x: dict[str, list[float]] = {}
    xs: dict[str, Any] = {}
    stds: dict[str, float | None] = {}
    for t in rows:
        v = value(t)
        if v is None:
            continue
        k = json.dumps(t["values"][key])
        by_x.setdefault(k, []).append(v)
        xs[k] = t["values"][key]
        stds[k] = t.get("metric_std") if value(t) == t["metric"] else None
    out = []
    for k, vs in by_x.items():
        std = statistics.stdev(vs) if len(vs) > 1 else stds[k]
        out.append((xs[k], statistics.fmean(vs), std))
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _, _ in out)
    return sorted(out, key=lambda p: p[0] if numeric else json.dumps(p[0]))


def render(data: dict[str, Any]) -> str:
    """The page: the ranked table, then one chart per swept key (and the rank charts for a rank sweep)."""
    trials, keys, metric = data["trials"], data["keys"], data["metric"]
    charts = []
    if RANK in keys:
        charts.append(_rank_chart(data, "loss", "held-out loss vs rank"))
        if metric != "loss":
            charts.append(_rank_chart(data, metric, f"{metric} vs rank"))
    for key in keys:
        if key != RANK:
            charts.append(_key_chart(trials, keys, key, metric))
    title = html.escape(f"finetune sweep {data['sweep']}")
    knee_lines = "".join(f"<li>{_knee_text(k, metric)}</li>" for k in data.get("knees", []))
    return f"""{page_head(title, "td.l, th.l { text-align: left; }")}
<p>{len(trials)} trial(s) of <code>{html.escape(str(data["file"]))}</code>, ranked by {html.escape(metric)}
({data["direction"]}); seeds {html.escape(", ".join(map(str, data["seeds"])))}; updated {html.escape(str(data["updated"]))}.</p>
{f"<ul>{knee_lines}</ul>" if knee_lines else ""}
<div class="charts">{"".join(charts)}</div>
<h2>Trials</h2>
{_table(trials, keys, metric)}
</body></html>
"""


def _knee_text(k: dict[str, Any], metric: str) -> str:
    group = ", ".join(f"{key.split('.')[-1]} {v}" for key, v in k["group"].items())
    if k["still_paying"]:
        return html.escape(f"{group + ': ' if group else ''}doubling the rank still paid up to rank {k['rank']}, "
                           f"the largest tried (by more than {k['margin']:g} in {metric})")  # fmt: skip
    larger = (
        "no larger rank was tried"
        if k["best_larger"] is None
        else f"the best larger rank reaches {k['best_larger']:.4f}"
    )
    return html.escape(
        f"{group + ': ' if group else ''}rank {k['rank']} is where doubling stops paying: {metric} {k['metric']:.4f}; "
        f"{larger} (margin {k['margin']:g})"
    )


def _rank_chart(data: dict[str, Any], figure: str, title: str) -> str:
    """A figure against rank (log2), one line per other-key group, trainable params dashed on the right axis."""
    trials, keys = data["trials"], data["keys"]
    groups = _groups(trials, keys, RANK)

    def value(t: dict) -> float | None:
        return t["metric"] if figure == data["metric"] else t["figures"].get(figure)

    lines = [(g, _points(rows, RANK, value)) for g, rows in groups]
    points = [p for _, pts in lines for p in pts]
    if not points:
        return _empty(title)
    ys = [m + s * (std or 0) for _, m, std in points for s in (-1, 1)]
    ranks = sorted({p[0] for p in points})
    params = _params_lines(groups)
    names = [_group_label(g) or figure for g, _ in lines] + (
        ["trainable params (right axis, dashed)"] if params else []
    )
    frame = Frame(title, ranks, ys, width=520, height=280, log_x=True, right=64, legend=names)
    parts = frame.axes([(r, str(r)) for r in ranks])
    if params:
        values = sorted({v for line in params for _, v in line})
        p0, p1 = values[0], values[-1]
        scale = (p0, p1) if p1 > p0 else (p0 - 1, p0 + 1)  # one value: drawn mid-height, labelled once
        for line in params:
            parts += frame.line(line, PARAMS_COLOR, dashed=True, scale=scale)
        ends = sorted({p0, p1})
        for v, label in zip(ends, tick_labels(ends, _si), strict=True):
            y = frame.sy(v, *scale)
            parts.append(
                f'<text x="{frame.width - frame.right + 4}" y="{y + 4:.1f}" font-size="11" fill="{PARAMS_COLOR}">{label}</text>'
            )
        parts.append(frame.legend(len(lines), "trainable params (right axis, dashed)", PARAMS_COLOR))
    for i, (group, pts) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        parts += frame.line([(x, m) for x, m, _ in pts], color)
        parts += _error_bars(frame, pts, color)
        parts.append(frame.legend(i, _group_label(group) or figure, color))
        if figure == data["metric"]:
            parts += _knee_marks(frame, data, group, color, row=i)
    return frame.svg(parts)


def _params_lines(groups: list[tuple[dict, list[dict]]]) -> list[list[tuple[float, float]]]:
    """Trainable parameters against rank, one line per group: they grow linearly with rank, at a slope that
    depends on the other keys (the targets), and a search may try each group at one rank only."""
    lines = []
    for _, rows in groups:
        pts = {t["values"][RANK]: t["trainable_params"] for t in rows if t.get("trainable_params")}
        if pts:
            lines.append(sorted(pts.items()))
    return lines


def _knee_marks(frame: Frame, data: dict[str, Any], group: dict[str, Any], color: str, row: int) -> list[str]:
    """The knee of one group: a dashed line, a ring, and a label on the group's own row (labels never overlap)."""
    parts = []
    for k in data.get("knees", []):
        if k["group"] == group and not k["still_paying"]:
            x, y = frame.sx(k["rank"]), frame.sy(k["metric"])
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.height - frame.bottom}" stroke="{color}" stroke-dasharray="2,3"/>'
            )
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{color}" stroke-width="2"/>')
            left = x > (frame.left + frame.width - frame.right) / 2  # the label extends away from the chart's edge
            anchor, tx = ("end", x - 4) if left else ("start", x + 4)
            y = frame.height - frame.bottom - 4 - KNEE_ROW * row
            parts.append(
                f'<text x="{tx:.1f}" y="{y}" text-anchor="{anchor}" font-size="11" fill="{color}">r={k["rank"]}: doubling stops paying</text>'
            )
    return parts


def _error_bars(frame: Frame, pts: list[tuple[Any, float, float | None]], color: str) -> list[str]:
    parts = []
    for x, m, std in pts:
        if std:
            px, lo, hi = frame.sx(x), frame.sy(m - std), frame.sy(m + std)
            parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="{color}"/>')
            parts += [
                f'<line x1="{px - 4:.1f}" x2="{px + 4:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"/>'
                for y in (lo, hi)
            ]
    return parts


def _key_chart(trials: list[dict], keys: list[str], key: str, metric: str) -> str:
    """The metric against one key: numbers on a linear (or log2, for wide positive ranges) axis, else categories."""
    groups = _groups(trials, keys, key)
    lines = [(g, _points(rows, key, lambda t: t["metric"])) for g, rows in groups]
    points = [p for _, pts in lines for p in pts]
    title = f"{metric} vs {key}"
    if not points:
        return _empty(title)
    raw = [p[0] for p in points]
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw)
    categories = [] if numeric else list(dict.fromkeys(json.dumps(x) for x in sorted(raw, key=json.dumps)))

    def position(x: Any) -> float:
        return float(x) if numeric else float(categories.index(json.dumps(x)))

    log_x = numeric and min(raw) > 0 and max(raw) / min(raw) >= 8
    ys = [m + s * (std or 0) for _, m, std in points for s in (-1, 1)]
    xs = [position(x) for x in raw] if numeric or len(categories) > 1 else [-0.5, 0.5]
    if not numeric:
        xs = [-0.5, len(categories) - 0.5]
    frame = Frame(
        title, xs, ys, width=520, height=280, log_x=log_x, legend=[_group_label(g) or metric for g, _ in lines]
    )
    ticks = sorted({position(x) for x in raw})
    labels = [(t, f"{t:g}" if numeric else _category(categories[int(t)])) for t in ticks]
    parts = frame.axes(labels if len(labels) <= 12 else None)
    for i, (group, pts) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        moved = [(position(x), m, std) for x, m, std in pts]
        parts += frame.line([(x, m) for x, m, _ in moved], color) if len(moved) > 1 else []
        parts += [f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(m):.1f}" r="3" fill="{color}"/>' for x, m, _ in moved]
        parts += _error_bars(frame, moved, color)
        parts.append(frame.legend(i, _group_label(group) or metric, color))
    return frame.svg(parts)


def _category(text: str) -> str:
    value = json.loads(text)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _group_label(group: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_category(json.dumps(v))}" for k, v in group.items())


def _empty(title: str) -> str:
    return (
        f'<svg width="520" height="280"><text x="10" y="20">{html.escape(title)}: no completed trial yet</text></svg>'
    )


def _si(n: float, digits: int = 3) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{digits}g}{unit}"
    return f"{n:.{digits}g}"


def _table(trials: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    head = "".join(f'<th class="l">{html.escape(k)}</th>' for k in keys)
    rows = []
    for t in trials:
        cells = "".join(f'<td class="l">{html.escape(_category(json.dumps(t["values"].get(k))))}</td>' for k in keys)
        value = (
            "-"
            if t["metric"] is None
            else f"{t['metric']:.4f}" + (f" ± {t['metric_std']:.4f}" if t.get("metric_std") else "")
        )
        loss = t["figures"].get("loss")
        params = f"{t['trainable_params']:,}" if t.get("trainable_params") else "-"
        seconds = f"{t['seconds']:.0f}" if t.get("seconds") else "-"
        note = t.get("error") or ""
        rows.append(
            f"<tr><td>{t['rank'] or ''}</td><td class='l'>{html.escape(t['name'])}</td>{cells}<td>{value}</td>"
            f"<td>{'-' if loss is None else f'{loss:.4f}'}</td><td>{params}</td><td>{seconds}</td>"
            f"<td class='l'>{html.escape(t['status'] or '')}</td><td class='l'>{html.escape(note)}</td></tr>"
        )
    return (
        f"<table><tr><th>#</th><th class='l'>trial</th>{head}<th>{html.escape(metric)}</th><th>held-out loss</th>"
        f"<th>trainable params</th><th>seconds</th><th class='l'>status</th><th class='l'>note</th></tr>{''.join(rows)}</table>"
    )
