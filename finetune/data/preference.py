"""Preference data: pairs (DPO) and judged completions (KTO), tokenized with only the answers scored.

The prompt is rendered by the chat template up to its generation prompt and tokenized alone,
exactly as the model sees it when it generates; the answer is the rest of the rendered chat
(the assistant's text and its end-of-turn token), tokenized on its own. TRL's collators then
score the answer tokens only (`completion_mask`), so a mask cannot slip into the prompt.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from finetune.data import mix, sources
from finetune.data.formats import BadRow, Judged, Sample, to_judged
from finetune.data.prepare import SourceStats, _nothing_left, _round_up, _slice_of, check_slices, hold_out, percentile
from finetune.data.templates import recipe_template, render
from finetune.errors import DataError, Problem, UserError
from finetune.recipe.schema import DataSource, Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Encoded = tuple[list[int], list[int]]  # (prompt_ids, completion_ids)


@dataclass
class PreferenceStats:
    sources: list[SourceStats] = field(default_factory=list)
    paired: bool = True
    train_rows: int = 0  # pairs (paired) or completions (unpaired) kept for training
    eval_rows: int = 0
    duplicates_train_eval: int = 0
    max_seq_length: int = 0
    truncated: int = 0  # rows with a side cut at max_seq_length
    truncated_identical: int = 0  # pairs whose sides no longer differ once cut: dropped, they teach nothing
    dropped: int = 0
    desirable: int = 0
    undesirable: int = 0
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # prompt/chosen/rejected: p50/p95/max tokens
    suggested_max_seq_length: int = 0
    checks: dict[str, Any] = field(default_factory=dict)  # data/pair_checks.py findings, before any row is dropped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreferenceData:
    """What a preference trainer and its evaluation need; `eval_samples` feed the generation metrics."""

    train: Dataset
    eval: Dataset | None
    eval_samples: list[Sample]
    stats: PreferenceStats
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # tokenized held-out rows, for preference metrics
    train_where: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first training rows as text, both sides


def prepare_preference(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreferenceData:
    """Validate, split, render and tokenize the recipe's preference data for `train.method`."""
    from datasets import Dataset

    recipe_template(recipe, tokenizer)
    mix.refuse_weights(recipe)
    paired = recipe.train.method == "dpo"
    stats = PreferenceStats(paired=paired)
    train, held_out = _split(recipe, stats)
    train = _checked(recipe, tokenizer, train, held_out, stats)
    eval_keys = {_key(group) for group in held_out}
    stats.duplicates_train_eval = sum(_key(group) in eval_keys for group in train)
    train_enc = [[_encode(tokenizer, j) for j in group] for group in train]
    eval_enc = [[_encode(tokenizer, j) for j in group] for group in held_out]
    stats.lengths = _lengths(train_enc, paired)
    longest = max(len(p) + len(c) for group in train_enc for p, c in group)
    max_len = recipe.data.max_seq_length if recipe.data.max_seq_length != "auto" else _round_up(longest)
    stats.max_seq_length = max_len
    stats.suggested_max_seq_length = _round_up(longest)
    train_rows, kept = _fit(train, train_enc, max_len, recipe.data.truncation, stats)
    eval_rows, _ = _fit(held_out, eval_enc, max_len, recipe.data.truncation, PreferenceStats())
    if not train_rows:
        raise DataError("no training rows left after validation and truncation")
    if not paired:  # KTO: every side is its own row, in a seeded order (TRL reads it sequentially)
        train_rows = [r for group in train_rows for r in _unpair(group)]
        random.Random(recipe.seed).shuffle(train_rows)
        stats.desirable = sum(r["label"] for r in train_rows)
        stats.undesirable = len(train_rows) - stats.desirable
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    columns = _columns(train_rows)
    eval_flat = eval_rows if paired else [r for group in eval_rows for r in _unpair(group)]
    return PreferenceData(
        train=Dataset.from_dict(columns),
        eval=Dataset.from_dict(_columns(eval_flat)) if eval_flat else None,
        eval_samples=[group[0].as_sample() for group in held_out if group[0].desirable],
        stats=stats,
        eval_rows=eval_rows,
        train_where=[train[i][0].where for i in kept],
        examples=[_example(tokenizer, group) for group in (train_rows[:8] if paired else [])],
    )


def load_judged(
    sources_: list[DataSource], on_bad_row: str, stats: PreferenceStats, slice_by: str | None = None
) -> list[list[Judged]]:
    """Every row as a group of judged completions (a pair, or one unpaired row); bad rows name file and row.

    Each side carries the row's slice, as SFT samples do: the source's `slice:`, else the `slice_by` column."""
    groups: list[list[Judged]] = []
    for source in sources_:
        entry = SourceStats(source.path, source.format, sources.fingerprint(source))
        stats.sources.append(entry)
        for row in sources.read_rows(source):
            try:
                if row.problem is not None:  # not UTF-8, not JSON, malformed CSV: said as SFT data says it
                    raise BadRow(row.problem[1], row.problem[0])
                group = to_judged(row.data, row.where, source, pair=len(groups))
                name = source.slice or _slice_of(row.data, slice_by)
                groups.append(group if name is None else [replace(j, slice=name) for j in group])
                entry.rows += 1
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(Problem(f"{e} (set data.on_bad_row: skip to skip such rows)", row.where)) from None
                entry.skip(e.reason)
    return groups


def _split(recipe: Recipe, stats: PreferenceStats) -> tuple[list[list[Judged]], list[list[Judged]]]:
    """Train and held-out groups: explicit eval sources, or a seeded `split_ratio` of the training groups."""

    def load(sources_: list[DataSource]) -> list[list[Judged]]:
        return load_judged(sources_, recipe.data.on_bad_row, stats, recipe.eval.slice_by)

    train = load(list(recipe.data.train))
    if not train:  # every row skipped (on_bad_row: skip): say which files and why
        raise DataError(_nothing_left(stats, 0))
    train, held_out = hold_out(recipe, train, load)
    check_slices([group[0] for group in held_out], recipe.eval.slice_by)
    return train, held_out


def _checked(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: list[list[Judged]],
             held_out: list[list[Judged]], stats: PreferenceStats) -> list[list[Judged]]:  # fmt: skip
    """Record the data checks' findings; drop or stop as data.dedup / data.leakage ask."""
    from finetune.data import checks
    from finetune.data.pair_checks import check_pairs

    kto = recipe.train.kto
    weights = (kto.desirable_weight, kto.undesirable_weight) if recipe.train.method == "kto" else None
    result = check_pairs(train, held_out, list(tokenizer.all_special_tokens), recipe.data.near_duplicate_threshold,
                         weights)  # fmt: skip
    kept = checks.act(result, train, recipe.data)
    stats.checks = checks.recorded(result)
    return kept


def _key(group: list[Judged]) -> tuple:
    return tuple((j.prompt, j.completion, j.desirable) for j in group)


def _encode(tokenizer: PreTrainedTokenizerBase, judged: Judged) -> Encoded:
    """prompt_ids: the chat up to the generation prompt; completion_ids: the answer and its end-of-turn text."""
    prompt_messages = [{"role": r, "content": c} for r, c in judged.prompt]
    prompt = render(tokenizer, prompt_messages, generation_prompt=True)
    full = render(tokenizer, [*prompt_messages, {"role": "assistant", "content": judged.completion}])
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise UserError(
            f"{judged.where}: the chat template renders the prompt differently when an answer follows it, so the "
            "answer tokens cannot be located; use another data.chat_template"
        )
    ids = tokenizer([prompt, full[len(prompt) :]], add_special_tokens=False)["input_ids"]
    return list(ids[0]), list(ids[1])


def _fit(
    groups: list[list[Judged]], encoded: list[list[Encoded]], max_len: int, mode: str, stats: PreferenceStats
) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Cut (or drop) rows longer than max_len, as TRL's collator would (keep the start), and count them.

    A pair whose sides are identical after the cut, or a prompt that leaves no room for an answer,
    is dropped and counted: it would train nothing.
    """
    out, kept = [], []
    for i, (group, enc) in enumerate(zip(groups, encoded, strict=True)):
        prompt = enc[0][0]
        over = any(len(p) + len(c) > max_len for p, c in enc)
        if over and mode == "drop":
            stats.dropped += 1
            continue
        if len(prompt) >= max_len:
            stats.dropped += 1
            continue
        room = max_len - len(prompt)
        answers = [c[:room] for _, c in enc]
        if over:
            stats.truncated += 1
            if len(answers) == 2 and answers[0] == answers[1]:
                stats.truncated_identical += 1
                stats.dropped += 1
                continue
        rows = [
            {"prompt_ids": prompt, "completion_ids": a, "label": j.desirable, "where": j.where, "slice": j.slice}
            for j, a in zip(group, answers, strict=True)
        ]
        out.append(rows)
        kept.append(i)
    return out, kept


def _unpair(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("prompt_ids", "completion_ids", "label")} for r in group]


def _columns(rows: list[Any]) -> dict[str, list]:
    """DPO columns from pairs (chosen first), KTO columns from single rows."""
    if rows and isinstance(rows[0], list):
        return {
            "prompt_ids": [g[0]["prompt_ids"] for g in rows],
            "chosen_ids": [g[0]["completion_ids"] for g in rows],
            "rejected_ids": [g[1]["completion_ids"] for g in rows],
        }
    return {k: [r[k] for r in rows] for k in ("prompt_ids", "completion_ids", "label")}


def _lengths(encoded: list[list[Encoded]], paired: bool) -> dict[str, dict[str, int]]:
    sides = {"prompt": [g[0][0] for g in encoded]}
    if paired:
        sides |= {"chosen": [g[0][1] for g in encoded], "rejected": [g[1][1] for g in encoded if len(g) > 1]}
    else:
        sides |= {"completion": [c for g in encoded for _, c in g]}
    out = {}
    for name, seqs in sides.items():
        lengths = sorted(len(s) for s in seqs)
        out[name] = {
            "p50": percentile(lengths, 50),
            "p95": percentile(lengths, 95),
            "max": lengths[-1] if lengths else 0,
        }
    return out


def _example(tokenizer: PreTrainedTokenizerBase, group: list[dict[str, Any]]) -> dict[str, Any]:
    """A training pair as text, as the model sees it: the prompt once, each scored answer after it."""
    return {
        "where": group[0]["where"],
        "prompt": tokenizer.decode(group[0]["prompt_ids"]),
        "chosen": tokenizer.decode(group[0]["completion_ids"]),
        "rejected": tokenizer.decode(group[1]["completion_ids"]),
        "tokens": {
            "prompt": len(group[0]["prompt_ids"]),
            "chosen": len(group[0]["completion_ids"]),
            "rejected": len(group[1]["completion_ids"]),
        },
    }
