"""Prompts for reinforcement learning (GRPO): each row's prompt as the model sees it, its answer kept as reference.

Any SFT format works: the prompt is the conversation up to the last assistant turn, rendered by the
chat template up to its generation prompt (exactly the text `eval`, `chat` and `serve` give the model);
the reference is that turn's text (a `preference` row's chosen answer, a `completion` row's
completion), which the reward functions receive beside each sampled completion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.data import mix
from finetune.data.formats import Sample
from finetune.data.prepare import DataStats, SourceStats, _round_up, percentile, split
from finetune.data.templates import encode, prompt_and_reference, recipe_template
from finetune.errors import DataError
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass
class PromptStats:
    sources: list[SourceStats] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    duplicates_train_eval: int = 0
    max_seq_length: int = 0  # prompt tokens at most + train.grpo.max_completion_length
    dropped: int = 0  # prompts longer than data.max_seq_length allows: never cut (a cut prompt asks another question)
    truncated: int = 0  # always 0, for the same reason
    prompt_tokens: int = 0  # all training prompts together, once each
    prompt_lengths: dict[str, int] = field(default_factory=dict)  # p50/p95/max tokens of the training prompts
    reference_lengths: dict[str, int] = field(default_factory=dict)
    suggested_max_seq_length: int = 0
    checks: dict[str, Any] = field(default_factory=dict)  # data/checks.py findings on the prompts and references

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptData:
    """What the GRPO trainer and its evaluation need; `eval_samples` feed the held-out rewards and metrics."""

    train: Dataset  # columns: prompt (rendered text), reference, where
    eval: Dataset | None
    eval_samples: list[Sample]
    stats: PromptStats
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first training prompts as text


def prepare_prompts(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PromptData:
    """Validate, split and render the recipe's data as prompts with references; count what is dropped."""
    from datasets import Dataset

    recipe_template(recipe, tokenizer)
    mix.refuse_weights(recipe)
    counted = DataStats()
    train, held_out = split(recipe, counted)
    stats = PromptStats(sources=counted.sources)
    train = _checked(recipe, tokenizer, train, held_out, stats)
    budget = recipe.train.grpo.max_completion_length
    train_rows = _rows(tokenizer, train, recipe.data.max_seq_length, budget, stats)
    eval_rows = _rows(tokenizer, held_out, recipe.data.max_seq_length, budget, PromptStats())
    if not train_rows:
        raise DataError(
            f"no training prompts left: {stats.dropped} longer than data.max_seq_length ({recipe.data.max_seq_length}) "
            f"minus train.grpo.max_completion_length ({budget}) allows"
        )
    eval_keys = {r["prompt"] for r in eval_rows}
    stats.duplicates_train_eval = sum(r["prompt"] in eval_keys for r in train_rows)
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    lengths = sorted(r["tokens"] for r in train_rows)
    references = sorted(len(encode(tokenizer, r["reference"])) for r in train_rows)
    stats.prompt_tokens = sum(lengths)
    stats.prompt_lengths = _percentiles(lengths)
    stats.reference_lengths = _percentiles(references)
    stats.max_seq_length = lengths[-1] + budget
    stats.suggested_max_seq_length = _round_up(lengths[-1] + budget)
    kept = {r["where"] for r in eval_rows}
    columns = ("prompt", "reference", "where")
    return PromptData(
        train=Dataset.from_dict({c: [r[c] for r in train_rows] for c in columns}),
        eval=Dataset.from_dict({c: [r[c] for r in eval_rows] for c in columns}) if eval_rows else None,
        eval_samples=[s for s in held_out if s.where in kept],
        stats=stats,
        examples=[{k: r[k] for k in ("where", "prompt", "reference", "tokens")} for r in train_rows[:8]],
    )


def _checked(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: list[Sample], held_out: list[Sample],
             stats: PromptStats) -> list[Sample]:  # fmt: skip
    """The SFT checks on prompts and references, less the token-level ones (nothing is trained on a prompt's
    tokens): a repeated prompt is sampled more often, a held-out prompt in train inflates held-out rewards, one
    prompt with two references gives a reference-based reward two answers to reward."""
    from finetune.data import checks

    result = checks.check(train, held_out, None, 0, list(tokenizer.all_special_tokens),
                          recipe.data.near_duplicate_threshold)  # fmt: skip
    kept = checks.act(result, train, recipe.data)
    stats.checks = checks.recorded(result)
    return kept


def _rows(
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    max_seq_length: int | str,
    budget: int,
    stats: PromptStats,
) -> list[dict[str, Any]]:
    """Rendered prompts with their references; a prompt that leaves no room for `budget` tokens is dropped."""
    rows = []
    for sample in samples:
        prompt, reference = prompt_and_reference(tokenizer, sample)
        tokens = len(encode(tokenizer, prompt))
        if max_seq_length != "auto" and tokens + budget > max_seq_length:
            stats.dropped += 1
            continue
        rows.append({"prompt": prompt, "reference": reference, "where": sample.where, "tokens": tokens})
    return rows


def _percentiles(lengths: list[int]) -> dict[str, int]:
    return {"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": lengths[-1] if lengths else 0}
