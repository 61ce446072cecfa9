"""GRPO through TRL's GRPOTrainer: the hooks `finetune.train` calls for `train.method: grpo`.

For each prompt TRL samples `num_generations` completions with the model's KV cache (or vLLM),
scores them with the recipe's rewards, and pushes the policy towards the completions that beat
their group's mean. Continuing a run (`model.from_run`), the parent's adapter is the policy's start
and, with beta > 0, its frozen reference (TRL copies it into a "ref" adapter); from the base, a fresh
adapter is trained and the reference is the base. The prompts are the text `eval` renders, tokenized
the same way, so training samples answers to exactly the prompts that `eval`, `chat` and `serve` give.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import GRPOConfig, GRPOTrainer

from finetune.data.prompts import PromptData, prepare_prompts
from finetune.errors import RewardFailed, UserError
from finetune.inference.loaded import REFERENCE_ADAPTER
from finetune.methods.reference import policy
from finetune.methods.rewards import Reward
from finetune.recipe.schema import Recipe
from finetune.trainer import SafeTraining, build

if TYPE_CHECKING:
    from finetune.runs import RunDir
    from finetune.speed import Speed
    from finetune.summary import EvalSummary

# the hooks finetune.train calls
__all__ = ["BEST", "PACKABLE", "compare", "config", "evaluate", "figures", "make_trainer", "policy", "prepare"]

BEST = ("eval_reward", True)  # in-training evaluation keeps the adapter with the highest held-out reward
PACKABLE = False  # TRL batches the prompts' groups of completions itself: no packing, no padding-free batches


def prepare(recipe: Recipe, tokenizer: Any) -> PromptData:
    """The prompts; first, what the method needs of the machine, before any weight is read."""
    if recipe.train.grpo.use_vllm:
        _check_vllm()
    return prepare_prompts(recipe, tokenizer)


def config(recipe: Recipe, common: dict[str, Any], max_length: int, speed: Speed) -> GRPOConfig:
    """TRL's GRPOConfig: the shared training arguments plus the method's own options."""
    o = recipe.train.grpo
    groups = max(1, recipe.train.batch_size // o.num_generations)
    return GRPOConfig(
        **{**common, "per_device_eval_batch_size": groups * o.num_generations},  # whole groups in held-out batches
        num_generations=o.num_generations,
        max_completion_length=o.max_completion_length,
        temperature=o.temperature,
        top_p=o.top_p,
        beta=o.beta,
        loss_type=o.loss_type,
        scale_rewards=o.scale_rewards,
        epsilon=o.epsilon,
        num_iterations=o.num_iterations,
        mask_truncated_completions=o.mask_truncated_completions,
        reward_weights=list(o.reward_weights) if o.reward_weights else None,
        use_vllm=o.use_vllm,
        vllm_mode="colocate",
        disable_dropout=True,
        log_completions=False,
    )


def _check_vllm() -> None:
    """train.grpo.use_vllm: said plainly before the model is loaded, rather than as TRL's import error mid-setup."""
    import importlib.util

    from finetune.machine import this_machine

    missing = [why for why, ok in (("a CUDA GPU", this_machine().cuda),
                                   ("vLLM (pip install vllm)", importlib.util.find_spec("vllm") is not None)) if not ok]  # fmt: skip
    if missing:
        raise UserError(f"train.grpo.use_vllm: true needs {' and '.join(missing)}; set it to false to generate with "
                        "transformers (the KV cache)")  # fmt: skip


class FinetuneGRPOTrainer(SafeTraining, GRPOTrainer):
    """TRL's GRPOTrainer on our rendered prompts, with SafeTraining and a checkpoint before a reward failure stops it."""

    def _tokenize_prompts(self, prompts: list):
        """The rendered prompt text already holds the template's special tokens: add none (as `eval` does)."""
        return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except RewardFailed as e:
            if self.state.global_step > 0:  # the last completed step: nothing of this one was applied yet
                self._save_checkpoint(self.model, trial=None)
                e.checkpoint_step = self.state.global_step
            raise


def make_trainer(
    recipe: Recipe, model: Any, tokenizer: Any, data: PromptData, args: Any, peft_config: Any, callbacks: list
) -> FinetuneGRPOTrainer:
    rewards = [Reward(spec) for spec in recipe.train.grpo.rewards]
    return build(FinetuneGRPOTrainer, model, tokenizer, data, args, peft_config, callbacks,
                 loraplus_lr_ratio=recipe.train.loraplus_lr_ratio, reward_funcs=rewards)  # fmt: skip


def compare(recipe: Recipe, model: Any, tokenizer: Any, data: PromptData, has_reference: bool) -> Any:
    from finetune.methods.grpo_eval import compare_rewards

    return compare_rewards(recipe, model, tokenizer, data, has_reference)


def figures(recipe: Recipe) -> list[str]:
    """The tuned figures `compare` reports: the rewards' weighted sum, each reward, then the generation metrics."""
    from finetune.methods.grpo_eval import TOTAL
    from finetune.scoring import metric_names

    rewards = metric_names(list(recipe.train.grpo.rewards))
    return list(dict.fromkeys([TOTAL, *rewards, *metric_names(list(recipe.eval.metrics))]))


def evaluate(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PromptData) -> EvalSummary | None:
    """Held-out rewards and generation metrics, greedy, for tuned, parent (or base) and base; written to eval/."""
    from finetune.lineage import parent_of
    from finetune.methods.preference_eval import write_preference_eval

    if not data.eval_samples:
        return None
    parent = parent_of(recipe)
    if parent is not None and REFERENCE_ADAPTER not in model.peft_config:  # beta 0: TRL kept no frozen copy
        model.load_adapter(str(parent.adapter), adapter_name=REFERENCE_ADAPTER)
        model.set_adapter("default")
    comparison = compare(recipe, model, tokenizer, data, REFERENCE_ADAPTER in model.peft_config)
    return write_preference_eval(recipe, run, comparison)
