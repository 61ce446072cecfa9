"""Training methods, each a module with the same hooks that `finetune.train` calls (SFT, DPO and KTO, GRPO):

    prepare(recipe, tokenizer) -> data                  tokenized train/held-out sets and their stats
    policy(recipe, model) -> (model, targets, peft_config)   a parent run's adapter, or a new one for TRL
    config(recipe, common_args, max_length, speed) -> the TRL config (common_args: `train.training_arguments`)
    make_trainer(recipe, model, tokenizer, data, args, peft_config, callbacks) -> a TRL trainer with SafeTraining
    compare(recipe, model, tokenizer, data, has_reference) -> held-out scores of tuned, reference (if any) and base
    evaluate(recipe, run, model, tokenizer, data) -> the eval summary written to eval/ (compare, then write)
    figures(recipe) -> the names of the tuned figures `compare` reports (what `eval --require` may name)
    BEST = (logged metric, higher is better): what in-training evaluation keeps the best adapter by
    PACKABLE: whether the rows may be packed or batched padding-free (the `speed` decisions)

The run directory, manifest, checkpoints, resume, signals, NaN stop and report are shared
(`finetune.train`, `finetune.trainer`): a method only says what differs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {"sft": "sft", "dpo": "preference", "kto": "preference", "grpo": "grpo"}


def load(method: str) -> ModuleType:
    """The module implementing `train.method`."""
    return importlib.import_module(f"finetune.methods.{MODULES[method]}")
