"""The reference of a preference run: the parent's adapter, loaded beside the policy under TRL's name for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.lineage import parent_of
from finetune.recipe import Recipe

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a continued adapter


def beta(recipe: Recipe) -> float:
    """The method's beta: how far the implicit reward scales the log-probability ratio to the reference."""
    return recipe.train.dpo.beta if recipe.train.method == "dpo" else recipe.train.kto.beta


def load_for_eval(recipe: Recipe, adapter: Path, model: Any) -> Any:
    """The run's adapter as "default" and, for a continued run, the parent's adapter as the reference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter)
    parent = parent_of(recipe)
    if parent is not None:
        model.load_adapter(parent.adapter, adapter_name=REFERENCE_ADAPTER)
        model.set_adapter("default")
    return model
