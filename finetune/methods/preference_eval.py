"""Held-out evaluation of a preference run: what the stage gained, and what it cost on the task.

Three models from one PEFT model: the tuned adapter, the reference (the parent run's adapter, or
the base when the run started from the base) and the base (adapters disabled). For each:
- preference_accuracy: share of held-out pairs where its implicit reward beta*(log p - log p_ref)
  is higher for chosen than for rejected (ties count half, so the reference scores 0.5 by definition);
  for unpaired (KTO) rows, the share whose reward sign agrees with the label;
- reward_margin: mean reward(chosen) - reward(rejected);
- likelihood_accuracy: share of pairs where the model itself gives chosen the higher log-probability;
- logps: mean summed log-probability of the chosen and rejected answers;
- the recipe's generation metrics (eval.metrics) on the held-out prompts, chosen answer as reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.data.templates import prompt_and_reference
from finetune.scoring import ModelScores, example_rows, metric_functions, score
from finetune.summary import EvalSummary, Preference, Scores

if TYPE_CHECKING:
    from finetune.data.preference import PreferenceData
    from finetune.recipe.schema import Recipe
    from finetune.runs import RunDir

MODELS = ("tuned", "reference", "base")
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin", "likelihood_accuracy")


@dataclass
class Sides:
    """What the preference metrics are computed from, kept so that they can be recomputed on any slice's rows:
    each model's summed log-probability per scored answer, its label, the answers per held-out group (2 for a
    pair, 1 for a KTO row) and each group's slice."""

    logps: dict[str, list[float]]
    labels: list[bool]
    groups: list[int]
    slices: list[str | None]

    def part(self, groups: list[int]) -> tuple[dict[str, list[float]], list[bool], list[int]]:
        """The logps, labels and group sizes of the groups numbered `groups`, in order."""
        starts = [0, *itertools.accumulate(self.groups)]
        rows = [starts[g] + k for g in groups for k in range(self.groups[g])]
        logps = {name: [values[r] for r in rows] for name, values in self.logps.items()}
        return logps, [self.labels[r] for r in rows], [self.groups[g] for g in groups]


@dataclass
class PreferenceComparison:
    method: str
    beta: float
    pairs: int
    scores: dict[str, ModelScores]  # by model name; metrics hold the preference metrics and generation metrics
    logps: dict[str, dict[str, float]]
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    reference_is_base: bool = False
    slices: list[str | None] = field(default_factory=list)  # each prompt's slice (None: none)
    sides: Sides | None = None  # DPO/KTO: the per-answer figures, for the preference metrics per slice

    def summary(self) -> EvalSummary:
        """The typed held-out summary: tuned and base as for SFT runs, plus the reference and the method; then the
        same figures per slice (preference metrics over the slice's pairs, generation metrics over its prompts)."""

        def scores(name: str) -> Scores | None:
            s = self.scores.get(name)
            logps = self.logps.get(name)
            return None if s is None else Scores(None, None, dict(s.metrics), None if logps is None else dict(logps))

        summary = self._summary(scores, len(self.prompts), self.pairs, None)
        group_slices = self.sides.slices if self.sides else []
        names = sorted({s for s in (*self.slices, *group_slices) if s is not None})
        summary.slices = {name: self._slice(name) for name in names}
        return summary

    def _summary(self, scores: Callable[[str], Scores | None], examples: int, pairs: int,
                 rows: list[int] | None) -> EvalSummary:  # fmt: skip
        reference = scores("reference")
        return EvalSummary(
            tuned=scores("tuned"),
            base=scores("base"),
            examples=examples,
            records=self._records("base", rows),
            preference=Preference(self.method, self.beta, pairs, reference, self.reference_is_base,
                                  self._records("reference", rows)),
        )  # fmt: skip

    def _slice(self, name: str) -> EvalSummary:
        """One slice's summary: the preference metrics recomputed on its pairs (or KTO rows), the generation
        metrics averaged over its prompts; a slice without prompts (KTO rows all undesirable) has none of those."""
        rows = [i for i, s in enumerate(self.slices) if s == name]
        groups = [g for g, s in enumerate(self.sides.slices) if s == name] if self.sides else []
        figures: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        if groups and self.sides is not None:
            logps, labels, sizes = self.sides.part(groups)
            figures = {
                m: _preference_metrics(v, logps["reference"], labels, sizes, self.beta) for m, v in logps.items()
            }

        def scores(model: str) -> Scores | None:
            s = self.scores.get(model)
            if s is None:
                return None
            preference, logps = figures.get(model, ({}, None))
            generated = {k: sum(v[i] for i in rows) / len(rows) for k, v in s.per_example.items()} if rows else {}
            return Scores(None, None, {**preference, **generated}, logps)

        return self._summary(scores, len(rows), len(groups), rows)

    def _records(self, other: str, rows: list[int] | None = None) -> dict[str, dict[str, int]]:
        """Per-example wins, losses and ties of tuned against `other` (over `rows`, default all), for the metrics
        scored per example."""
        tuned, them = self.scores["tuned"], self.scores.get(other)
        if them is None:
            return {}
        out = {}
        for metric in tuned.per_example:
            if metric in them.per_example:
                pairs = list(zip(tuned.per_example[metric], them.per_example[metric], strict=True))
                pairs = pairs if rows is None else [pairs[i] for i in rows]
                if pairs or rows is None:
                    out[metric] = {"wins": sum(t > b for t, b in pairs), "losses": sum(t < b for t, b in pairs),
                                   "ties": sum(t == b for t, b in pairs)}  # fmt: skip
        return out

    def examples(self) -> list[dict[str, Any]]:
        """Rows keyed as every method's: `reference` the gold answer, `reference_model` the reference's answer."""
        models = {name: s for name, s in self.scores.items() if s is not None}
        return example_rows(self.prompts, self.references, models, self.slices)


@torch.no_grad()
def completion_logps(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-probability of each completion given its prompt (prompt tokens are not scored)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(batch):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, len(p) : len(p) + len(c)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        out += (logp * scored[:, 1:].to(device)).sum(dim=1).tolist()
    return out


def compare_preference(
    recipe: Recipe, model: Any, tokenizer: Any, data: PreferenceData, has_reference: bool
) -> PreferenceComparison:
    """Score tuned, reference and base on the held-out rows: preference metrics, then generation metrics."""
    from finetune.methods.reference import beta

    e = recipe.eval
    b = beta(recipe)
    rows = [r for group in data.eval_rows for r in group]
    sides = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    samples = data.eval_samples[: e.limit] if e.limit else data.eval_samples
    pairs = [prompt_and_reference(tokenizer, s) for s in samples]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    metrics = metric_functions(list(e.metrics), e)

    logps: dict[str, list[float]] = {}
    scores: dict[str, ModelScores] = {}
    for name, context in model_contexts(model, has_reference, e.compare_base).items():
        with context():
            logps[name] = completion_logps(model, sides, tokenizer.pad_token_id, e.batch_size)
            scores[name] = score(model, tokenizer, None, prompts, references, metrics, e.max_new_tokens, e.batch_size)
    if e.compare_base and not has_reference:  # the reference is the base itself
        logps["base"], scores["base"] = logps["reference"], _copy(scores["reference"])
    labels = [bool(r["label"]) for r in rows]
    groups = [len(g) for g in data.eval_rows]
    figures = {}
    for name in logps:
        preference, figures[name] = _preference_metrics(logps[name], logps["reference"], labels, groups, b)
        scores[name].metrics = {**preference, **scores[name].metrics}
    sides = Sides(logps, labels, groups, [group[0]["slice"] for group in data.eval_rows])
    return PreferenceComparison(recipe.train.method, b, len(data.eval_rows), scores, figures, prompts, references,
                                reference_is_base=not has_reference, slices=[s.slice for s in samples], sides=sides)  # fmt: skip


def model_contexts(model: Any, has_reference: bool, compare_base: bool) -> dict[str, Callable[[], Any]]:
    """The models to score, by name, each a context in which `model` is that model: the tuned adapter; the reference
    (the parent's frozen adapter, else the base); the base (`compare_base`), unless the reference is the base
    already, which is then scored once. Shared by the preference and the GRPO evaluations."""
    from finetune.inference.loaded import REFERENCE_ADAPTER

    reference = (lambda: adapter_context(model, REFERENCE_ADAPTER)) if has_reference else model.disable_adapter
    contexts = {"tuned": nullcontext, "reference": reference}
    if compare_base and has_reference:
        contexts["base"] = model.disable_adapter
    return contexts


def adapter_context(model: Any, name: str) -> Any:
    """A context in which `model` runs with its adapter `name` (then the previous one again)."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, name)


def _copy(s: ModelScores) -> ModelScores:
    return ModelScores(s.loss, s.perplexity, dict(s.metrics), list(s.outputs), dict(s.per_example), list(s.tokens),
                       list(s.latency))  # fmt: skip


def _preference_metrics(
    ours: list[float], ref: list[float], labels: list[bool], groups: list[int], beta: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Preference accuracy, reward margin and likelihood accuracy over pairs (groups of 2) or labelled rows."""
    rewards = [beta * (o - r) for o, r in zip(ours, ref, strict=True)]
    chosen = [i for i, good in enumerate(labels) if good]
    rejected = [i for i, good in enumerate(labels) if not good]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    logps = {"chosen": mean([ours[i] for i in chosen]), "rejected": mean([ours[i] for i in rejected])}
    if groups and all(n == 2 for n in groups):  # pairs: chosen then rejected
        wins = [_win(rewards[i], rewards[i + 1]) for i in range(0, len(rewards), 2)]
        likely = [_win(ours[i], ours[i + 1]) for i in range(0, len(ours), 2)]
        margin = mean([rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)])
    else:
        wins = [_win(r, 0.0) if good else _win(0.0, r) for r, good in zip(rewards, labels, strict=True)]
        likely = wins
        margin = mean([rewards[i] for i in chosen]) - mean([rewards[i] for i in rejected])
    metrics = {"preference_accuracy": mean(wins), "reward_margin": margin, "likelihood_accuracy": mean(likely)}
    return metrics, logps


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def write_preference_eval(
    recipe: Recipe, run: RunDir, comparison: PreferenceComparison, out: Path | None = None
) -> EvalSummary:
    """eval/summary.json and examples.jsonl (or `out`, for an ad-hoc `finetune eval`); returns the summary."""
    from finetune.runs import write_eval

    summary = comparison.summary()
    write_eval(run, summary.to_dict(), comparison.examples(), None, out)
    return summary
