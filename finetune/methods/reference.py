"""A continued run's parent adapter: trained further as the policy, and kept frozen beside it as the reference
(under TRL's name for it) by the methods that use one (DPO, KTO, GRPO with beta > 0)."""

from __future__ import annotations

from typing import Any

from finetune.lineage import parent_of
from finetune.modeling import lora_config, resolve_targets
from finetune.recipe.schema import Recipe


def policy(recipe: Recipe, model: Any) -> tuple[Any, list[str], Any]:
    """(model, LoRA target modules, peft_config for TRL or None): the parent's adapter, trainable, or a new one."""
    parent = parent_of(recipe)
    if parent is None:
        targets = resolve_targets(recipe, model)
        return model, targets, lora_config(recipe, targets)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, parent.adapter, is_trainable=True)
    targets = sorted(model.peft_config["default"].target_modules)
    return model, targets, None


def beta(recipe: Recipe) -> float:
    """The method's beta: how strongly the policy is tied to the reference (the implicit reward's scale, or GRPO's KL)."""
    return getattr(recipe.train, recipe.train.method).beta
