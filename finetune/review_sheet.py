"""Blind human review: a sheet of held-out prompts with the tuned and base answers in random order, and its ratings.

`finetune eval RUN --review-sheet sheet.csv` writes sheet.csv and sheet.html (the same items; the page is
self-contained, readable offline, and can download the filled CSV) from the run's newest evaluation that
compared tuned with base (an examples.jsonl under RUN/eval/). The answers are labelled 1 and 2, the order drawn
per item from the recipe's seed; which one is the tuned model's is written only to the key,
RUN/eval/review/<sheet>.json, which stays in the run. The sheet names no model.

`finetune eval RUN --ratings sheet.csv` reads the filled sheet (`preferred`: 1, 2, tie, or empty for not
rated), finds its key by the `sheet` column, and reports how often the tuned answer was preferred, overall and
per slice (a `slice` field of the evaluated rows, where they carry one), in RUN/eval/review/<sheet>.ratings.json.
Every problem in a sheet is reported at once, by row and column (exit 2).

The preference is a proportion of paired judgements, so its interval is the Wilson score interval on
wins / (wins + losses): ties are counted and reported but excluded from the rate, as a tie says neither is
better; Wilson's interval stays inside [0, 1] and keeps its coverage at the small n (20-200 items) a human
review has, where the normal approximation does not. `Tally` is shared with the LLM judge's pairwise mode.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import Problem, UserError
from finetune.uncertainty import wilson

COLUMNS = ["sheet", "item", "prompt", "answer_1", "answer_2", "preferred", "comment"]
REQUIRED = ("sheet", "item", "preferred")
CHOICES = {"1": "1", "2": "2", "tie": "tie", "": ""}


@dataclass
class Tally:
    """Paired preferences of tuned against base: wins, losses, ties, and items left unrated (or unparsed)."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    unrated: int = 0

    def add(self, outcome: str) -> None:
        """outcome: `tuned` (tuned preferred), `base`, `tie`, or `` (no rating)."""
        if outcome == "tuned":
            self.wins += 1
        elif outcome == "base":
            self.losses += 1
        elif outcome == "tie":
            self.ties += 1
        else:
            self.unrated += 1

    def to_dict(self) -> dict[str, Any]:
        decisive = self.wins + self.losses
        interval = wilson(self.wins, decisive)
        return {
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "unrated": self.unrated,
            "win_rate": self.wins / decisive if decisive else None,
            "interval": list(interval) if interval else None,
            "interval_method": "Wilson score, 95%, on wins / (wins + losses); ties excluded",
        }


# --- writing a sheet ------------------------------------------------------------------------------------------


@dataclass
class SheetResult:
    csv: str
    html: str
    key: str
    items: int
    examples: str
    slices: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def latest_examples(eval_dir: Path) -> Path:
    """The newest examples.jsonl under RUN/eval/ whose rows hold both a tuned and a base answer."""
    found = sorted(
        (p for p in [eval_dir / "examples.jsonl", *eval_dir.glob("*/examples.jsonl")] if p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in found:
        rows = _rows(path)
        if rows and all(r.get("tuned") is not None and r.get("base") is not None for r in rows):
            return path
    raise UserError(
        f"{eval_dir}: no evaluation with tuned and base answers to review; run `finetune eval RUN --against base` first"
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_sheet(eval_dir: Path, out: Path, seed: int) -> SheetResult:
    """sheet CSV and HTML at `out` (.csv and .html beside each other) and the key in RUN/eval/review/."""
    examples = latest_examples(eval_dir)
    rows = _rows(examples)
    digest = hashlib.sha256(examples.read_bytes()).hexdigest()
    sheet = hashlib.sha256(f"{digest}:{seed}".encode()).hexdigest()[:12]
    rng = random.Random(f"{seed}:{sheet}")
    order = list(range(len(rows)))
    rng.shuffle(order)  # the items' order differs from the eval's, so a rater cannot line them up with it
    items, key_items = [], []
    for n, i in enumerate(order, start=1):
        row, tuned = rows[i], rng.choice((1, 2))
        answers = (row["tuned"], row["base"]) if tuned == 1 else (row["base"], row["tuned"])
        items.append({"sheet": sheet, "item": n, "prompt": row["prompt"], "answer_1": answers[0],
                      "answer_2": answers[1], "preferred": "", "comment": ""})  # fmt: skip
        key_items.append({"item": n, "row": i, "tuned": tuned, "slice": row.get("slice")})
    csv_path, html_path = out.with_suffix(".csv"), out.with_suffix(".html")
    key_path = eval_dir / "review" / f"{sheet}.json"
    key = {"sheet": sheet, "examples": str(examples), "examples_sha256": digest, "seed": seed, "items": key_items}
    for path in (csv_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(csv_path, items)
    html_path.write_text(sheet_html(sheet, items), encoding="utf-8")
    key_path.write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    slices: dict[str, int] = {}
    for item in key_items:
        if item["slice"] is not None:
            slices[str(item["slice"])] = slices.get(str(item["slice"]), 0) + 1
    return SheetResult(str(csv_path), str(html_path), str(key_path), len(items), str(examples), slices)


def _write_csv(path: Path, items: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(items)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Blind review {sheet}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
.item {{ border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1em 0; }}
.answers {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .6em; border-radius: 4px; margin: .3em 0; }}
.choice label {{ margin-right: 1.5em; }} textarea {{ width: 100%; }} h2 {{ font-size: 1em; margin: 0; }}
</style></head><body>
<h1>Blind review: sheet {sheet}</h1>
<p>For each prompt, pick the better answer (or a tie). The answers are in random order and come from two
models; nothing here says which. Then press <b>Download ratings</b> and send back the CSV file
(or fill the <code>preferred</code> column of the CSV sheet directly: 1, 2 or tie).</p>
{items}
<p><button id="download">Download ratings</button> <span id="count"></span></p>
<script type="application/json" id="sheet">{data}</script>
<script>
const items = JSON.parse(document.getElementById("sheet").textContent);
const columns = {columns};
const quote = v => '"' + String(v).replace(/"/g, '""') + '"';
function rated() {{
  return items.map(it => Object.assign({{}}, it, {{
    preferred: (document.querySelector(`input[name="p${{it.item}}"]:checked`) || {{value: ""}}).value,
    comment: document.getElementById(`c${{it.item}}`).value}}));
}}
function count() {{
  document.getElementById("count").textContent = rated().filter(r => r.preferred).length + " of " + items.length + " rated";
}}
document.addEventListener("change", count); count();
document.getElementById("download").onclick = () => {{
  const lines = [columns.join(",")].concat(rated().map(r => columns.map(c => quote(r[c])).join(",")));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\\r\\n") + "\\r\\n"], {{type: "text/csv"}}));
  link.download = "ratings-{sheet}.csv"; link.click();
}};
</script></body></html>
"""

_ITEM = """<div class="item"><h2>Item {item}</h2><pre>{prompt}</pre>
<div class="answers"><div><b>Answer 1</b><pre>{answer_1}</pre></div><div><b>Answer 2</b><pre>{answer_2}</pre></div></div>
<div class="choice">Better: <label><input type="radio" name="p{item}" value="1"> 1</label>
<label><input type="radio" name="p{item}" value="2"> 2</label>
<label><input type="radio" name="p{item}" value="tie"> tie</label></div>
<textarea id="c{item}" rows="1" placeholder="comment (optional)"></textarea></div>"""


def sheet_html(sheet: str, items: list[dict[str, Any]]) -> str:
    """The self-contained review page: every text escaped, the data for the download embedded as JSON."""
    body = "\n".join(
        _ITEM.format(item=it["item"], **{k: html.escape(str(it[k])) for k in ("prompt", "answer_1", "answer_2")})
        for it in items
    )
    data = json.dumps(items, ensure_ascii=True).replace("</", "<\\/")
    return _PAGE.format(sheet=html.escape(sheet), items=body, data=data, columns=json.dumps(COLUMNS))


# --- reading ratings back -------------------------------------------------------------------------------------


@dataclass
class RatingsResult:
    sheet: str
    ratings: str
    record: str
    overall: dict[str, Any]
    slices: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def read_ratings(eval_dir: Path, path: Path) -> RatingsResult:
    """The filled sheet checked against its key; the preference for tuned over base written to the eval record."""
    rows, problems = _read_csv(path)
    keys: dict[str, dict[str, Any]] = {}
    outcomes: list[tuple[dict[str, Any], str]] = []
    seen: dict[tuple[str, int], int] = {}
    for n, row in rows:
        where = f"{path}, row {n}"
        sheet = (row.get("sheet") or "").strip()
        key = keys.get(sheet) or _key(eval_dir, sheet)
        if key is None:
            problems.append(Problem(f"no sheet {sheet!r} was written for this run (no key in {eval_dir / 'review'})",
                                    where, "column sheet"))  # fmt: skip
            continue
        keys[sheet] = key
        item = _item(row.get("item"), key)
        if item is None:
            problems.append(Problem(f"{row.get('item')!r} is not an item of sheet {sheet}", where, "column item"))
            continue
        if (sheet, item["item"]) in seen:
            problems.append(Problem(f"item {item['item']} is rated again (first on row {seen[sheet, item['item']]})",
                                    where, "column item"))  # fmt: skip
            continue
        seen[sheet, item["item"]] = n
        choice = CHOICES.get((row.get("preferred") or "").strip().lower())
        if choice is None:
            problems.append(
                Problem(f"{row['preferred']!r}: use 1, 2, tie, or leave it empty", where, "column preferred")
            )
            continue
        outcome = (
            "" if not choice else "tie" if choice == "tie" else "tuned" if int(choice) == item["tuned"] else "base"
        )
        outcomes.append((item, outcome))
    if problems:
        raise UserError(problems)
    if len(keys) != 1:
        raise UserError(Problem("a ratings file holds one sheet's rows", str(path), "column sheet"))
    key = next(iter(keys.values()))
    rated = {item["item"] for item, _ in outcomes}
    outcomes += [(item, "") for item in key["items"] if item["item"] not in rated]  # rows deleted: not rated
    return _record(eval_dir, path, key["sheet"], outcomes)


def _read_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[Problem]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = [(n, row) for n, row in enumerate(reader, start=2)]  # row 1 is the header, as a spreadsheet shows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(Problem(f"cannot read the ratings: {e}", str(path))) from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise UserError(Problem(f"missing column(s) {', '.join(missing)} (the header has {', '.join(header) or 'nothing'})",
                                f"{path}, row 1"))  # fmt: skip
    if not rows:
        raise UserError(Problem("no rated rows", str(path)))
    return rows, [Problem("more cells than columns", f"{path}, row {n}") for n, row in rows if None in row]


def _key(eval_dir: Path, sheet: str) -> dict[str, Any] | None:
    if not sheet or not sheet.isalnum():
        return None
    try:
        return json.loads((eval_dir / "review" / f"{sheet}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _item(value: str | None, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        n = int((value or "").strip())
    except ValueError:
        return None
    return key["items"][n - 1] if 1 <= n <= len(key["items"]) else None


def _record(eval_dir: Path, path: Path, sheet: str, outcomes: list[tuple[dict[str, Any], str]]) -> RatingsResult:
    overall, slices = Tally(), {}
    for item, outcome in outcomes:
        overall.add(outcome)
        if item.get("slice") is not None:
            slices.setdefault(str(item["slice"]), Tally()).add(outcome)
    record = eval_dir / "review" / f"{sheet}.ratings.json"
    result = RatingsResult(
        sheet, str(path), str(record), overall.to_dict(), {k: t.to_dict() for k, t in slices.items()}
    )
    record.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
