"""Scoring a model on held-out rows: the generation metrics, the loss on trained tokens, tuned against base.

Every method's evaluation (SFT's here, DPO/KTO's and GRPO's in `finetune.methods`) scores through
these functions, and both `finetune eval` and the end of training call them, so a figure means the
same wherever it is reported. The base model is the same PEFT model with its adapter disabled, so
both see the same prompts, template, tokenizer and greedy decoding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from finetune.data.formats import Sample
from finetune.data.templates import IGNORE, prompt_and_reference
from finetune.errors import UserError
from finetune.generation import generate
from finetune.recipe.schema import GENERATION_METRICS, LOSS_METRICS
from finetune.summary import EvalSummary, Scores

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Metric = Callable[[str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    return float(reference.strip() in prediction)


def regex(prediction: str, reference: str) -> float:
    """The reference is a regular expression that the whole (stripped) prediction must match."""
    try:
        return float(re.fullmatch(reference.strip(), prediction.strip(), flags=re.DOTALL) is not None)
    except re.error:
        return 0.0


def json_valid(prediction: str, reference: str) -> float:
    try:
        json.loads(prediction)
    except ValueError:
        return 0.0
    return 1.0


GENERATION_FUNCTIONS: dict[str, Metric] = {name: globals()[name] for name in GENERATION_METRICS}  # named alike


def metric_functions(names: list[str] | tuple[str, ...]) -> dict[str, Metric]:
    """Generation metrics by the name tables show; `module:function` imports a user metric(prediction, reference).

    The loader already found the module (beside the recipe, else installed: `finetune.recipe.callables`),
    and `validate` and the start of `train` imported it, so this fails only if it changed since.
    """
    from finetune.recipe import callables

    out = {}
    for name in names:
        if name in LOSS_METRICS:
            continue
        if name in GENERATION_FUNCTIONS:
            out[name] = GENERATION_FUNCTIONS[name]
            continue
        try:
            out[callables.short_name(name)] = callables.load(name, ("prediction", "reference"))
        except callables.CallableError as e:
            raise UserError(f"eval.metrics: {callables.short_name(name)}: {e}") from None
    return out


def metric_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """The generation metrics' names as tables, JSON and `eval --require` show them (`module:function` for a
    user's metric, without the path), in the recipe's order: the keys `metric_functions` returns."""
    from finetune.recipe.callables import short_name

    return list(dict.fromkeys(short_name(name) for name in names if name not in LOSS_METRICS))


@dataclass
class ModelScores:
    loss: float | None = None
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    per_example: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Comparison:
    tuned: ModelScores
    base: ModelScores | None
    references: list[str]
    prompts: list[str]

    def summary(self) -> EvalSummary:
        """Per model: loss, perplexity, metric means; per generation metric: per-example wins/losses/ties."""

        def scores(s: ModelScores | None) -> Scores | None:
            return None if s is None else Scores(s.loss, s.perplexity, dict(s.metrics))

        records = {} if self.base is None else {name: self._record(name) for name in self.tuned.metrics}
        return EvalSummary(scores(self.tuned), scores(self.base), len(self.references), records)

    def _record(self, name: str) -> dict[str, int]:
        pairs = list(zip(self.tuned.per_example[name], self.base.per_example[name], strict=True))
        return {
            "wins": sum(t > b for t, b in pairs),
            "losses": sum(t < b for t, b in pairs),
            "ties": sum(t == b for t, b in pairs),
        }

    def examples(self) -> list[dict[str, Any]]:
        models = {"tuned": self.tuned} | ({} if self.base is None else {"base": self.base})
        return example_rows(self.prompts, self.references, models)


# eval/examples.jsonl: one row per held-out prompt, the same keys for every method. `reference` is always the
# gold answer (what the metrics score against); each model's answer is under its own key, and the reference
# model of a DPO/KTO/GRPO run (its parent's adapter, or the base) answers as `reference_model`.
EXAMPLE_KEYS = {"tuned": "tuned", "base": "base", "reference": "reference_model"}


def example_rows(prompts: list[str], references: list[str], models: dict[str, ModelScores]) -> list[dict[str, Any]]:
    """The rows of eval/examples.jsonl: prompt, gold `reference`, then each model's answer and per-example scores
    (the answer is None when eval.metrics has only loss and perplexity, so nothing was generated)."""
    rows = []
    for i, (prompt, gold) in enumerate(zip(prompts, references, strict=True)):
        row: dict[str, Any] = {"prompt": prompt, "reference": gold}
        for name, s in models.items():
            key = EXAMPLE_KEYS[name]
            row[key] = s.outputs[i] if s.outputs else None
            row[f"{key}_scores"] = {k: v[i] for k, v in s.per_example.items()}
        rows.append(row)
    return rows


@torch.no_grad()
def held_out_loss(model: PreTrainedModel, dataset: Dataset, pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over the trained (labelled) tokens, weighted by token, as in training."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device)
        total += torch.nn.functional.cross_entropy(
            shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((shift_labels != IGNORE).sum())
    return total / max(count, 1)


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset | None,
    prompts: list[str],
    references: list[str],
    metrics: dict[str, Metric],
    max_new_tokens: int,
    batch_size: int,
) -> ModelScores:
    scores = ModelScores()
    if dataset is not None and len(dataset):
        scores.loss = held_out_loss(model, dataset, tokenizer.pad_token_id)
        scores.perplexity = math.exp(min(scores.loss, 50))
    if metrics and prompts:
        scores.outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        for name, fn in metrics.items():
            values = [float(fn(p, r)) for p, r in zip(scores.outputs, references, strict=True)]
            scores.per_example[name] = values
            scores.metrics[name] = sum(values) / len(values)
    return scores


def compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset | None,
    samples: list[Sample],
    metric_names: list[str] | tuple[str, ...],
    max_new_tokens: int,
    batch_size: int,
    with_base: bool,
    limit: int | None = None,
) -> Comparison:
    """Score the PEFT model with its adapter, and (with_base) with the adapter disabled."""
    samples = samples[:limit] if limit else samples
    pairs = [prompt_and_reference(tokenizer, s) for s in samples]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    metrics = metric_functions(metric_names)
    run = lambda: score(model, tokenizer, dataset, prompts, references, metrics, max_new_tokens, batch_size)  # noqa: E731
    tuned = run()
    base = None
    if with_base:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            base = run()
    return Comparison(tuned, base, references, prompts)
