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
from finetune.generation import generate_timed
from finetune.recipe.schema import GENERATION_METRICS, LOSS_METRICS
from finetune.summary import EvalSummary, Scores
from finetune.uncertainty import paired

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from finetune.recipe.schema import EvalSection

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


# The built-in metrics that need nothing but the answer and its reference (json_schema needs its file: `options`)
GENERATION_FUNCTIONS: dict[str, Metric] = {name: globals()[name] for name in GENERATION_METRICS if name in globals()}


def metric_functions(names: list[str] | tuple[str, ...], options: EvalSection | None = None) -> dict[str, Metric]:
    """Generation metrics by the name tables show; `module:function` imports a user metric(prediction, reference).

    `options` (the recipe's `eval`) gives `regex` its pattern (`eval.regex`, else each reference is the pattern)
    and `json_schema` its file. The loader already found a user's module (beside the recipe, else installed:
    `finetune.recipe.callables`), and `validate` and the start of `train` imported it, so this fails only if it
    changed since.
    """
    from finetune.recipe import callables
    from finetune.scoring.structured import json_schema_metric, regex_metric

    out = {}
    for name in names:
        if name in LOSS_METRICS:
            continue
        if name == "regex" and options is not None and options.regex is not None:
            out[name] = regex_metric(options.regex)
            continue
        if name == "json_schema":
            if options is None or options.json_schema is None:
                raise UserError("eval.metrics: json_schema needs the schema file: set eval.json_schema")
            out[name] = json_schema_metric(options.json_schema)
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
    per_example: dict[str, list[float]] = field(default_factory=dict)  # metric -> one score per held-out prompt
    tokens: list[int] = field(default_factory=list)  # generated tokens per answer
    latency: list[float] = field(default_factory=list)  # seconds per answer (its batch's wall time)
    loss_sums: list[float] = field(default_factory=list)  # summed cross-entropy of each loss row's trained tokens
    loss_tokens: list[int] = field(default_factory=list)  # trained tokens per loss row (the same for every model)


@dataclass
class Comparison:
    """Tuned (and base) scores on the same held-out prompts; `slices` names each prompt's slice (None: no slice).

    Everything a summary reports is derived from `per_example`, so a metric scored elsewhere (a judge) that
    fills `ModelScores.per_example[name]` and `metrics[name]` gets its per-slice figures and intervals too.
    The loss is scored on the tokenized held-out rows (`ModelScores.loss_sums`), which are the prompts' rows less
    any that max_seq_length dropped: `loss_slices` names each loss row's slice, `loss_of` maps a prompt to its row.
    """

    tuned: ModelScores
    base: ModelScores | None
    references: list[str]
    prompts: list[str]
    slices: list[str | None] = field(default_factory=list)
    loss_slices: list[str | None] = field(default_factory=list)
    loss_of: dict[int, int] = field(default_factory=dict)

    def summary(self) -> EvalSummary:
        """Per model: loss, perplexity, metric means, answer cost; against the base, per metric (the loss too):
        the per-example record and a paired bootstrap interval of the delta; then the same per slice."""
        every = list(range(len(self.references)))
        summary = self._summary(every, list(range(len(self.tuned.loss_sums))), overall=True)
        names = sorted({s for s in (*self.slices, *self.loss_slices) if s is not None})
        summary.slices = {
            name: self._summary([i for i in every if self.slices[i] == name],
                                [j for j, s in enumerate(self.loss_slices) if s == name])
            for name in names
        }  # fmt: skip
        return summary

    def _summary(self, rows: list[int], loss_rows: list[int], overall: bool = False) -> EvalSummary:
        def scores(s: ModelScores | None) -> Scores | None:
            if s is None:
                return None
            metrics = {name: _mean([v[i] for i in rows]) for name, v in s.per_example.items()}
            loss = token_weighted(s, loss_rows) if s.loss_sums else s.loss if overall else None
            return Scores(loss, None if loss is None else perplexity(loss), metrics)

        records, intervals = {}, {}
        for name in self.tuned.per_example if self.base is not None else ():
            interval = paired([self.tuned.per_example[name][i] for i in rows],
                              [self.base.per_example[name][i] for i in rows])  # fmt: skip
            records[name] = {"wins": interval.wins, "losses": interval.losses, "ties": interval.ties}
            intervals[name] = {"low": interval.low, "high": interval.high, "sign_p": interval.sign_p}
        if self.base is not None and self.base.loss_sums and loss_rows:
            records["loss"], intervals["loss"] = loss_interval(self.tuned, self.base, loss_rows)
        cost = {k: answer_cost(s, rows) for k, s in (("tuned", self.tuned), ("base", self.base)) if s and s.tokens}
        counted = len(loss_rows) if self.tuned.loss_sums and len(loss_rows) != len(rows) else None
        return EvalSummary(scores(self.tuned), scores(self.base), len(rows), records, intervals=intervals, cost=cost,
                           loss_rows=counted)  # fmt: skip

    def examples(self) -> list[dict[str, Any]]:
        models = {"tuned": self.tuned} | ({} if self.base is None else {"base": self.base})
        return example_rows(self.prompts, self.references, models, self.slices, self.loss_of)


def token_weighted(s: ModelScores, loss_rows: list[int]) -> float | None:
    """The held-out loss over `loss_rows`: their summed cross-entropy over their trained tokens (a token-weighted
    mean, as in training), so a slice's figure and the overall one are the same statistic; None for no rows."""
    tokens = sum(s.loss_tokens[j] for j in loss_rows)
    return sum(s.loss_sums[j] for j in loss_rows) / tokens if tokens else None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


def loss_interval(tuned: ModelScores, base: ModelScores, loss_rows: list[int]) -> tuple[dict[str, int], dict]:
    """The record and paired bootstrap interval of the loss delta (tuned - base) over `loss_rows`, weighted by the
    rows' trained tokens as the loss itself is. A win is a row where tuned's loss is lower (the better way)."""
    w = [tuned.loss_tokens[j] for j in loss_rows]
    mean = lambda s: [s.loss_sums[j] / max(s.loss_tokens[j], 1) for j in loss_rows]  # noqa: E731
    interval = paired(mean(tuned), mean(base), weights=w)
    record = {"wins": interval.losses, "losses": interval.wins, "ties": interval.ties}
    return record, {"low": interval.low, "high": interval.high, "sign_p": interval.sign_p}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def answer_cost(s: ModelScores, rows: list[int]) -> dict[str, dict[str, float]]:
    """Generated tokens, latency and tokens/s per answer over `rows`, each as its mean and 95th percentile."""
    tokens = [s.tokens[i] for i in rows]
    latency = [s.latency[i] for i in rows]
    rates = [t / x for t, x in zip(tokens, latency, strict=True) if x > 0]
    return {"tokens": _spread(tokens), "latency_s": _spread(latency), "tokens_per_s": _spread(rates)}


def _spread(values: list[float]) -> dict[str, float]:
    """Mean and p95 (nearest rank) of a list; zeros for an empty one."""
    if not values:
        return {"mean": 0.0, "p95": 0.0}
    ordered = sorted(values)
    return {"mean": sum(ordered) / len(ordered), "p95": float(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])}


# eval/examples.jsonl: one row per held-out prompt, the same keys for every method. `reference` is always the
# gold answer (what the metrics score against); each model's answer is under its own key, and the reference
# model of a DPO/KTO/GRPO run (its parent's adapter, or the base) answers as `reference_model`.
EXAMPLE_KEYS = {"tuned": "tuned", "base": "base", "reference": "reference_model"}


def example_rows(
    prompts: list[str],
    references: list[str],
    models: dict[str, ModelScores],
    slices: list[str | None] | None = None,
    loss_of: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """The rows of eval/examples.jsonl: prompt, gold `reference`, its `slice` (None without one), then each
    model's answer, per-example scores and cost (`<model>_tokens`, `<model>_latency_s`; the answer is None
    when eval.metrics has only loss and perplexity, so nothing was generated). A row whose tokens the loss
    scored (`loss_of`: prompt -> loss row) has `loss_tokens` (its trained tokens) and `<model>_loss` (their mean
    cross-entropy): `runs compare` pairs two runs' losses row by row from these, weighted by `loss_tokens`."""
    rows = []
    for i, (prompt, gold) in enumerate(zip(prompts, references, strict=True)):
        row: dict[str, Any] = {"prompt": prompt, "reference": gold, "slice": slices[i] if slices else None}
        j = (loss_of or {}).get(i)
        for name, s in models.items():
            key = EXAMPLE_KEYS[name]
            row[key] = s.outputs[i] if s.outputs else None
            row[f"{key}_scores"] = {k: v[i] for k, v in s.per_example.items()}
            if s.tokens:
                row[f"{key}_tokens"], row[f"{key}_latency_s"] = s.tokens[i], round(s.latency[i], 4)
            if j is not None and s.loss_sums:
                row["loss_tokens"] = s.loss_tokens[j]
                row[f"{key}_loss"] = s.loss_sums[j] / max(s.loss_tokens[j], 1)
        rows.append(row)
    return rows


@torch.no_grad()
def held_out_losses(
    model: PreTrainedModel, dataset: Dataset, pad_id: int, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Per row: the summed cross-entropy over its trained (labelled) tokens, and how many there are.

    The held-out loss of any set of rows is sum(sums) / sum(tokens), weighted by token as in training: overall
    and per slice alike (`token_weighted`).
    """
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
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
        shift_labels = labels[:, 1:].to(device)
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(shift_labels.shape)
        sums += per_token.double().sum(dim=1).tolist()
        counts += (shift_labels != IGNORE).sum(dim=1).tolist()
    return sums, counts


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
        scores.loss_sums, scores.loss_tokens = held_out_losses(model, dataset, tokenizer.pad_token_id)
        scores.loss = token_weighted(scores, list(range(len(dataset))))
        scores.perplexity = None if scores.loss is None else perplexity(scores.loss)
    if metrics and prompts:
        generated = generate_timed(model, tokenizer, prompts, max_new_tokens, batch_size)
        scores.outputs, scores.tokens, scores.latency = generated.texts, generated.tokens, generated.seconds
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
    options: EvalSection | None = None,
    kept: list[int] | None = None,
) -> Comparison:
    """Score the PEFT model with its adapter, and (with_base) with the adapter disabled.

    `kept` (`PreparedData.eval_kept`) gives each row of `dataset` its sample, so the loss is sliced as the
    prompts are; without it the rows are taken to be the samples in order.
    """
    rows = len(dataset) if dataset is not None else 0
    owner = list(kept or range(len(samples)))[:rows]
    loss_slices = [samples[k].slice if k < len(samples) else None for k in owner]
    samples = samples[:limit] if limit else samples
    loss_of = {k: j for j, k in enumerate(owner) if k < len(samples)}
    pairs = [prompt_and_reference(tokenizer, s) for s in samples]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    metrics = metric_functions(metric_names, options)
    run = lambda: score(model, tokenizer, dataset, prompts, references, metrics, max_new_tokens, batch_size)  # noqa: E731
    tuned = run()
    base = None
    if with_base:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            base = run()
    return Comparison(tuned, base, references, prompts, [s.slice for s in samples], loss_slices, loss_of)
