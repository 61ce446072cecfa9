"""DPO and KTO through TRL's DPOTrainer and KTOTrainer: the hooks `finetune.train` calls for these methods.

The reference model is never a second copy of the base. Continuing a run (`model.from_run`), the
parent's adapter is loaded trainable as "default" and TRL copies it into a frozen "ref" adapter
on the same base, so the policy starts at the SFT model and is scored against the SFT model
(at the first step policy == reference: loss ln 2, rewards 0). From the base model instead, TRL
adds a fresh adapter and its reference is the base (adapter disabled), which a fresh LoRA equals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from finetune.data.preference import PreferenceData, prepare_preference
from finetune.inference.loaded import REFERENCE_ADAPTER
from finetune.methods.reference import policy
from finetune.recipe.schema import Recipe
from finetune.trainer import SafeTraining, build

if TYPE_CHECKING:
    from finetune.runs import RunDir
    from finetune.speed import Speed
    from finetune.summary import EvalSummary


def prepare(recipe: Recipe, tokenizer: Any) -> PreferenceData:
    return prepare_preference(recipe, tokenizer)


# the hooks finetune.train calls
__all__ = ["BEST", "PACKABLE", "compare", "config", "evaluate", "figures", "make_trainer", "policy", "prepare"]

BEST = ("eval_loss", False)  # in-training evaluation keeps the adapter with the lowest held-out (preference) loss
PACKABLE = False  # TRL batches the pairs (or judged rows) itself: no packing, no padding-free batches


def config(recipe: Recipe, common: dict[str, Any], max_length: int, speed: Speed) -> DPOConfig | KTOConfig:
    """TRL's DPOConfig/KTOConfig: the shared training arguments plus the method's own options."""
    shared = {**common, "max_length": max_length, "precompute_ref_log_probs": False, "disable_dropout": True}
    if recipe.train.method == "dpo":
        o = recipe.train.dpo
        losses = o.loss_type if isinstance(o.loss_type, list) else [o.loss_type]
        return DPOConfig(**shared, beta=o.beta, loss_type=list(losses), label_smoothing=o.label_smoothing,
                         loss_weights=list(o.loss_weights) if o.loss_weights else None)  # fmt: skip
    o = recipe.train.kto
    return KTOConfig(**shared, beta=o.beta, loss_type=o.loss_type, desirable_weight=o.desirable_weight,
                     undesirable_weight=o.undesirable_weight, train_sampling_strategy="sequential")  # fmt: skip


class FinetuneDPOTrainer(SafeTraining, DPOTrainer):
    """TRL's DPOTrainer on our tokenized pairs (prompt_ids/chosen_ids/rejected_ids), with SafeTraining."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # tokenized, masked and fitted by finetune.data.preference
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class FinetuneKTOTrainer(SafeTraining, KTOTrainer):
    """TRL's KTOTrainer on our tokenized rows (prompt_ids/completion_ids/label), with SafeTraining."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.calculate_KL:
            return dataset

        def mismatched(batch: dict[str, list]) -> dict[str, list]:
            # TRL's KL estimate: each completion paired with its batch neighbour's prompt (rotation by one)
            batch["KL_completion_ids"] = [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]
            return batch

        return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)


def make_trainer(
    recipe: Recipe, model: Any, tokenizer: Any, data: PreferenceData, args: Any, peft_config: Any, callbacks: list
) -> Any:
    cls = FinetuneDPOTrainer if recipe.train.method == "dpo" else FinetuneKTOTrainer
    return build(cls, model, tokenizer, data, args, peft_config, callbacks,
                 loraplus_lr_ratio=recipe.train.loraplus_lr_ratio)  # fmt: skip


def compare(recipe: Recipe, model: Any, tokenizer: Any, data: PreferenceData, has_reference: bool) -> Any:
    from finetune.methods.preference_eval import compare_preference

    return compare_preference(recipe, model, tokenizer, data, has_reference)


def figures(recipe: Recipe) -> list[str]:
    """The tuned figures `compare` reports: the preference metrics, then the generation metrics."""
    from finetune.methods.preference_eval import PREFERENCE_METRICS
    from finetune.scoring import metric_names

    return list(dict.fromkeys([*PREFERENCE_METRICS, *metric_names(list(recipe.eval.metrics))]))


def evaluate(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PreferenceData) -> EvalSummary | None:
    """Held-out preference metrics and generation metrics for tuned, reference and base; written to eval/."""
    from finetune.methods.preference_eval import write_preference_eval

    if not data.eval_rows:
        return None
    return write_preference_eval(
        recipe, run, compare(recipe, model, tokenizer, data, REFERENCE_ADAPTER in model.peft_config)
    )
