"""Held-out evaluation of a GRPO run: each reward, their weighted sum and the eval metrics, greedy, for three models.

The tuned adapter, the reference (the parent run's adapter, or the base for a run started from the
base) and the base (adapters disabled) each answer every held-out prompt greedily, as `eval` decodes;
every reward and generation metric scores the answers against the row's reference answer. `reward`
is the rewards' weighted sum per answer (TRL's training reward), averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.data.templates import prompt_and_reference
from finetune.methods.preference_eval import PreferenceComparison, model_contexts
from finetune.methods.rewards import Reward
from finetune.scoring import ModelScores, metric_functions, score

if TYPE_CHECKING:
    from finetune.data.prompts import PromptData
    from finetune.recipe.schema import Recipe

TOTAL = "reward"


def compare_rewards(
    recipe: Recipe, model: Any, tokenizer: Any, data: PromptData, has_reference: bool
) -> PreferenceComparison:
    """Score tuned, reference and base on the held-out prompts with the rewards and eval.metrics."""
    e, o = recipe.eval, recipe.train.grpo
    samples = data.eval_samples[: e.limit] if e.limit else data.eval_samples
    pairs = [prompt_and_reference(tokenizer, s) for s in samples]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    rewards = [Reward(spec) for spec in o.rewards]
    weights = list(o.reward_weights or [1.0] * len(rewards))
    metrics = {r.__name__: r.score for r in rewards} | metric_functions(list(e.metrics), e)
    scores: dict[str, ModelScores] = {}
    for name, context in model_contexts(model, has_reference, e.compare_base).items():
        with context():
            scores[name] = score(model, tokenizer, None, prompts, references, metrics, e.max_new_tokens, e.batch_size)
        _add_total(scores[name], [r.__name__ for r in rewards], weights)
    if e.compare_base and not has_reference:  # the reference is the base itself
        scores["base"] = scores["reference"]
    return PreferenceComparison("grpo", o.beta, 0, scores, {}, prompts, references, reference_is_base=not has_reference,
                                slices=[s.slice for s in samples])  # fmt: skip


def _add_total(s: ModelScores, names: list[str], weights: list[float]) -> None:
    """The weighted sum of the rewards per answer, first among the metrics (the figure a gate usually reads)."""
    if not s.outputs:
        return
    total = [sum(w * s.per_example[n][i] for n, w in zip(names, weights, strict=True)) for i in range(len(s.outputs))]
    s.per_example = {TOTAL: total, **s.per_example}
    s.metrics = {TOTAL: sum(total) / len(total), **s.metrics}
