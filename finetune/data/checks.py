"""Findings over prepared rows: what quietly ruins a run, each with counts and its first rows as `file:row`.

Duplicates and near-duplicates inside train (word 3-gram Jaccard, found through MinHash and LSH in
data/near.py), train/eval leakage, contradictions (one prompt, different answers), truncation damage, empty or
echoed answers, length outliers and template hazards (a template's own special tokens inside a
message). Checks only report; `to_drop` returns the training rows a recipe asks to drop.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from finetune.data.formats import Sample
from finetune.data.near import Sketch
from finetune.data.tokens import Tokens
from finetune.errors import DataError

Row = TypeVar("Row")

EXAMPLES = 5  # rows named per finding
OUTLIER_FACTOR = 8  # a row this many times the median token length is an outlier
FAIL_ON = ("duplicates", "leakage", "contradictions")  # the kinds `finetune data --fail-on` accepts
# Markers of common chat templates: in message text they break masks or teach the model to emit them.
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<|eot_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>", "<|user|>",
                    "<|assistant|>", "<|system|>", "<|end|>")  # fmt: skip
KINDS = (
    "duplicates",
    "near_duplicates",
    "leakage",
    "contradictions",
    "truncation",
    "answer_cut_away",
    "empty_answers",
    "echo_answers",
    "length_outliers",
    "template_tokens",
)  # the order findings are listed in


@dataclass
class Finding:
    kind: str  # duplicates | near_duplicates | leakage | contradictions | truncation | empty_answers | ...
    rows: int
    detail: str  # the figures in words, for the table and the train summary
    examples: list[str] = field(default_factory=list)  # "file:row", or "file:row = file:row" for pairs
    per_file: dict[str, int] = field(default_factory=dict)  # rows per source file


@dataclass
class ChecksResult:
    findings: list[Finding] = field(default_factory=list)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> kind -> rows; several files only
    dropped: dict[str, int] = field(default_factory=dict)  # e.g. {"duplicates": 3, "leakage": 1}
    matches: dict[str, set[int]] = field(default_factory=dict, repr=False)  # kind -> training rows, for to_drop

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "matches"}

    def summary(self) -> str:
        """One line for `train`: every finding's kind and rows, and what was dropped."""
        if not self.findings:
            return "data checks: no findings"
        parts = ", ".join(f"{f.rows} {f.kind.replace('_', ' ')}" for f in self.findings)
        dropped = ", ".join(f"{n} {k}" for k, n in self.dropped.items())
        return f"data checks: {parts}" + (f" (dropped: {dropped})" if dropped else "") + " - see `finetune data`"


def normalise(text: str) -> str:
    return " ".join(text.split())


def prompt_of(sample: Sample) -> str:
    """Everything before the last answer, whitespace-normalised."""
    if sample.is_chat:
        return "\n".join(f"{r}: {normalise(c)}" for r, c in sample.messages[:-1])
    return normalise(sample.prompt)


def answer_of(sample: Sample) -> str:
    return normalise(sample.messages[-1][1] if sample.is_chat else sample.completion)


def whole(sample: Sample) -> str:
    return prompt_of(sample) + "\n=> " + answer_of(sample)


@dataclass
class Texts:
    """The normalised texts every check compares, computed once per row."""

    prompts: list[str]
    answers: list[str]
    wholes: list[str]
    last_prompts: list[str]

    @classmethod
    def of(cls, samples: list[Sample]) -> Texts:
        prompts, answers = [prompt_of(s) for s in samples], [answer_of(s) for s in samples]
        wholes = [f"{p}\n=> {a}" for p, a in zip(prompts, answers, strict=True)]
        return cls(prompts, answers, wholes, [_last_prompt(s) for s in samples])


def _file(where: str) -> str:
    return where.rsplit(":", 1)[0]


def _finding(kind: str, rows: list[int], train: list[Any], detail: str) -> Finding:
    return Finding(kind, len(rows), detail, [train[i].where for i in rows[:EXAMPLES]], _by_file(rows, train))


def _by_file(rows: list[int], samples: list[Any]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for i in rows:
        out[_file(samples[i].where)] += 1
    return dict(out)


def _share(rows: list[int], trained: list[int] | None, n: int) -> str:
    """The share of trained tokens the rows hold, or of the n rows where nothing is trained token by token."""
    if trained is None:
        return f"{len(rows) / max(n, 1):.1%} of rows"
    return f"{sum(trained[i] for i in rows) / max(sum(trained), 1):.1%} of trained tokens"


# --- duplicates and near-duplicates -------------------------------------------------------


def exact_duplicates(texts: list[str]) -> dict[int, int]:
    """Each later copy's index -> the index of its first occurrence."""
    first: dict[str, int] = {}
    out = {}
    for i, t in enumerate(texts):
        if t in first:
            out[i] = first[t]
        else:
            first[t] = i
    return out


def near_duplicates(sketch: Sketch, threshold: float) -> dict[int, int]:
    """Each row's index -> the earliest earlier row whose word 3-gram Jaccard with it is >= threshold."""
    out: dict[int, int] = {}
    for i, j, _ in sketch.similar(threshold):
        out[j] = min(out.get(j, i), i)
    return out


# --- the checks ---------------------------------------------------------------------------


@dataclass
class TextChecks:
    """What the checks find in the rows' text alone: computed while the rows are tokenized (data/prepare.py runs
    it in one of the encoding workers), picklable."""

    exact: dict[int, int]  # later copy -> first occurrence
    near: dict[int, int]  # near-duplicate -> the earliest earlier row like it (exact copies left out)
    leaks: dict[int, int]  # training row -> the held-out row it matches
    findings: list[Finding]  # leakage, contradictions, empty or echoed answers, template tokens


def text_checks(train: list[Sample], held_out: list[Sample], special_tokens: list[str], threshold: float) -> TextChecks:
    texts, held = Texts.of(train), Texts.of(held_out)
    sketch = Sketch.of(held.wholes + texts.wholes)  # one pass for duplicates and leakage
    exact = exact_duplicates(texts.wholes)
    near = {i: j for i, j in near_duplicates(sketch.part(len(held_out)), threshold).items() if i not in exact}
    leaks = leaked(texts, held, sketch, threshold)
    findings = [
        *_leakage(train, held_out, leaks),
        *_contradictions(train, texts),
        *_answers(train, texts),
        *_template_tokens(train, [_raw_text(s) for s in train], special_tokens),
    ]
    return TextChecks(exact, near, leaks, findings)


def check(
    train: list[Sample],
    held_out: list[Sample],
    encoded: Tokens | None,
    max_len: int,
    special_tokens: list[str],
    threshold: float,
    text: TextChecks | None = None,
) -> ChecksResult:
    """Every finding over the training rows (and held-out rows for leakage), before anything is dropped; `text`:
    the text checks, when they were run already.

    Without `encoded` (GRPO prompts: nothing is trained on their tokens) truncation and length outliers
    are left out and duplicates are measured in rows."""
    text = text or text_checks(train, held_out, special_tokens, threshold)
    if encoded is None:
        return assemble(train, text, [], None)
    trained = encoded.trained().tolist()
    return assemble(train, text, [*_truncation(train, encoded, max_len), *_outliers(train, encoded)], trained)


def assemble(train: list[Sample], text: TextChecks, token_findings: list[Finding], trained: list[int] | None
             ) -> ChecksResult:  # fmt: skip
    """The findings in their one order (KINDS), empty ones left out, with the per-source figures and the matches."""
    findings = [*_duplicates(train, text.exact, text.near, trained), *text.findings, *token_findings]
    findings = sorted((f for f in findings if f.rows), key=lambda f: KINDS.index(f.kind))
    matches = {"duplicates": set(text.exact), "near_duplicates": set(text.near), "leakage": set(text.leaks)}
    return ChecksResult(findings, _per_source(train, findings), matches=matches)


def _duplicates(
    train: list[Any], exact: dict[int, int], near: dict[int, int], trained: list[int] | None
) -> list[Finding]:
    out = []
    for kind, found in (("duplicates", exact), ("near_duplicates", near)):
        rows = sorted(found)
        f = Finding(
            kind, len(rows), f"later copies; {_share(rows, trained, len(train))}", per_file=_by_file(rows, train)
        )
        f.examples = [f"{train[i].where} = {train[found[i]].where}" for i in rows[:EXAMPLES]]
        out.append(f)
    return out


def leaked(train: Texts, held: Texts, sketch: Sketch, threshold: float) -> dict[int, int]:
    """Training row index -> a held-out row index whose prompt or whole conversation matches it, exactly or
    nearly (`sketch` holds the held-out rows, then the training rows)."""
    if not held.wholes:
        return {}
    m = len(held.wholes)
    out = {j - m: i for i, j, _ in sorted(sketch.similar(threshold), reverse=True) if i < m <= j}
    prompts = {p: j for j, p in enumerate(held.prompts) if p}
    wholes = {w: j for j, w in enumerate(held.wholes)}
    for i, (p, w) in enumerate(zip(train.prompts, train.wholes, strict=True)):
        j = wholes.get(w, prompts.get(p))
        if j is not None:
            out[i] = j
    return out


def _leakage(train: list[Any], held_out: list[Any], found: dict[int, int]) -> list[Finding]:
    rows = sorted(found)
    f = Finding("leakage", len(set(found.values())), f"held-out rows also in train ({len(rows)} training rows)")
    f.per_file = _by_file(rows, train)
    f.examples = [f"{held_out[found[i]].where} = {train[i].where}" for i in rows[:EXAMPLES]]
    return [f]


def _contradictions(train: list[Sample], texts: Texts) -> list[Finding]:
    answers: dict[str, dict[str, int]] = defaultdict(dict)
    for i, (p, a) in enumerate(zip(texts.prompts, texts.answers, strict=True)):
        if p:
            answers[p].setdefault(a, i)
    groups = [list(a.values()) for a in answers.values() if len(a) > 1]
    rows = [i for g in groups for i in g]
    sims = [_jaccard(texts.answers[g[0]], texts.answers[j]) for g in groups for j in g[1:]]
    detail = f"{len(groups)} prompts with different answers" + (
        f"; answer word overlap min {min(sims):.2f}, mean {sum(sims) / len(sims):.2f}" if sims else ""
    )
    f = Finding("contradictions", len(rows), detail, per_file=_by_file(rows, train))
    f.examples = [" vs ".join(train[i].where for i in g[:3]) for g in groups[:EXAMPLES]]
    return [f]


def _jaccard(a: str, b: str) -> float:
    x, y = set(a.lower().split()), set(b.lower().split())
    return len(x & y) / max(len(x | y), 1)


def _truncation(train: list[Sample], encoded: Tokens, max_len: int) -> list[Finding]:
    trained, kept = encoded.trained(), encoded.trained(within=max_len)
    tail = trained - kept
    cut = np.flatnonzero(tail).tolist()
    gone = np.flatnonzero((tail > 0) & (kept == 0)).tolist()
    lost, total = int(tail.sum()), int(trained.sum())
    return [
        _finding("truncation", cut, train, f"rows whose trained tokens pass max_seq_length {max_len}; "
                 f"{lost:,} trained tokens lost ({lost / max(total, 1):.1%})"),
        _finding("answer_cut_away", gone, train, "rows with no trained token left within max_seq_length"),
    ]  # fmt: skip


def _answers(train: list[Sample], texts: Texts) -> list[Finding]:
    empty = [i for i, s in enumerate(train) if _empty_answer(s)]
    echo = [i for i, (a, p) in enumerate(zip(texts.answers, texts.last_prompts, strict=True)) if a and a == p]
    return [
        _finding("empty_answers", empty, train, "an answer that is empty or only whitespace"),
        _finding("echo_answers", echo, train, "the answer repeats the prompt word for word"),
    ]


def _empty_answer(sample: Sample) -> bool:
    if sample.is_chat:
        return any(r == "assistant" and not c.strip() for r, c in sample.messages)
    return not sample.completion.strip()


def _last_prompt(sample: Sample) -> str:
    if sample.is_chat:
        return normalise(sample.messages[-2][1]) if len(sample.messages) > 1 else ""
    return normalise(sample.prompt)


def _outliers(train: list[Sample], encoded: Tokens) -> list[Finding]:
    lengths = encoded.lengths()
    if not len(lengths):
        return []
    median = int(np.sort(lengths)[len(lengths) // 2])
    rows = np.flatnonzero(lengths > OUTLIER_FACTOR * median).tolist()
    return [_finding("length_outliers", rows, train, f"rows over {OUTLIER_FACTOR}x the median of {median} tokens")]


def _raw_text(sample: Sample) -> str:
    return "\n".join(c for _, c in sample.messages) if sample.is_chat else sample.prompt + "\n" + sample.completion


def _template_tokens(rows: list[Any], texts: list[str], special_tokens: list[str]) -> list[Finding]:
    """Rows (anything with `.where`) whose text holds a chat template's markers or the tokenizer's special tokens."""
    markers = sorted({*TEMPLATE_MARKERS, *(t for t in special_tokens if len(t) > 1)})
    pattern = re.compile("|".join(re.escape(m) for m in markers))
    found, seen = [], set()
    for i, text in enumerate(texts):
        hits = pattern.findall(text)
        if hits:
            found.append(i)
            seen.update(hits)
    return [_finding("template_tokens", found, rows, f"message text holds template tokens: {', '.join(sorted(seen))}")]


def _per_source(train: list[Sample], findings: list[Finding]) -> dict[str, dict[str, int]]:
    """Training rows and rows per finding of each file, when the training rows come from several files."""
    files = _by_file(list(range(len(train))), train)
    if len(files) < 2:
        return {}
    out = {name: {"rows": n} for name, n in sorted(files.items())}
    for f in findings:
        for name, n in f.per_file.items():
            out[name][f.kind] = n
    return out


def act(result: ChecksResult, rows: list[Row], data: Any) -> list[Row]:
    """What the recipe's data section asks of the findings: stop on `leakage: error`, drop per `dedup` and
    `leakage: drop`; the findings and what was dropped go into `result` (the caller records it)."""
    leak = next((f for f in result.findings if f.kind == "leakage"), None)
    if data.leakage == "error" and leak is not None:
        raise DataError(f"data.leakage: error: {leak.rows} {leak.detail}, first: {'; '.join(leak.examples)}")
    drop = to_drop(result, data.dedup, data.leakage)
    return [r for i, r in enumerate(rows) if i not in drop]


def recorded(result: ChecksResult) -> dict[str, Any]:
    """The findings as the manifest, the cache and `finetune data --json` keep them."""
    return result.to_dict() | {"summary": result.summary()}


def to_drop(result: ChecksResult, dedup: str, leakage: str) -> set[int]:
    """Training row indices the recipe asks to drop (from the matches `check` found), counted in `result.dropped`."""
    drop: set[int] = set()
    if dedup != "none":
        dups = result.matches["duplicates"] | (result.matches["near_duplicates"] if dedup == "near" else set())
        result.dropped["duplicates"] = len(dups)
        drop |= dups
    if leakage == "drop":
        leaks = result.matches["leakage"] - drop
        result.dropped["leakage"] = len(leaks)
        drop |= leaks
    return drop
