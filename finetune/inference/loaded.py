"""Opening a finished run for inference: the one room that `eval`, `chat` and `serve` all open runs through.

A run is named by its directory or by the recipe that made it (`runs.resolve_run`, one rule) and
opened as `merge` and `export` open it (`runs.open_run`: resolved recipe, manifest, checked
adapter). Its base loads as in training (4-bit for a QLoRA run) with the adapter on top; for a run
that continued another (DPO, KTO, GRPO) the parent's adapter sits beside it as the frozen reference.
A merged directory (`finetune merge`, `export --format merged`) loads as a plain model. The
tokenizer and chat template are those saved with the adapter, what training rendered with; the
stop ids are the generation config's and the tokenizer's end of turn (`generation.stop_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.generation import stop_ids
from finetune.recipe.schema import EvalSection, Recipe
from finetune.runs import Run, open_run, resolve_run

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a continued adapter; eval loads the parent's under it


@dataclass
class Loaded:
    """A model ready to answer: a run's base + adapter (PEFT), or a merged directory (plain transformers)."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_new_tokens: int  # the run's eval.max_new_tokens: chat answers as long as eval's
    run: Run | None = None

    @property
    def has_adapter(self) -> bool:
        return self.run is not None

    @property
    def stop_ids(self) -> list[int]:
        return stop_ids(self.model.generation_config, self.tokenizer)


def is_merged_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "adapter").exists()


def load(target: str | Path) -> Loaded:
    """Open a run (base + adapter, the base quantized as in training) or a merged model directory, to answer."""
    from peft import PeftModel

    from finetune.modeling import fit_vocabulary, quiet_libraries

    quiet_libraries()
    path = resolve_run(target)
    if is_merged_dir(path):
        return _load_merged(path)
    run = open_run(path)
    tokenizer = chat_tokenizer(run.adapter)
    base = base_model(run.recipe)
    fit_vocabulary(base, len(tokenizer))  # a run that added tokens (data.add_special_tokens): rows for them
    model = PeftModel.from_pretrained(base, str(run.adapter), adapter_name=run.recipe.name)
    model.eval()
    return Loaded(run.recipe.name, model, tokenizer, run.recipe.eval.max_new_tokens, run)


def _load_merged(path: Path) -> Loaded:
    """A merged model: weights, tokenizer and template together, and the recipe beside it for the eval budget."""
    from transformers import AutoModelForCausalLM

    from finetune.machine import device
    from finetune.recipe.load import load_recipe

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True).to(device()).eval()
    recipe_file = next((p for p in (path / "recipe.yaml", path.parent / "recipe.yaml") if p.is_file()), None)
    budget = EvalSection.model_fields["max_new_tokens"].default
    name = path.resolve().name
    if recipe_file is not None:
        recipe = load_recipe(recipe_file, check_files=False)
        budget, name = recipe.eval.max_new_tokens, f"{recipe.name}-merged"
    return Loaded(name, model, chat_tokenizer(path), budget)


def base_model(recipe: Recipe) -> PreTrainedModel:
    """The run's base model as training loaded it: its dtype, quantization and attention kernel on this machine."""
    from finetune.machine import this_machine
    from finetune.modeling import load_model, quiet_libraries
    from finetune.speed import model_attention

    quiet_libraries()
    return load_model(recipe, model_attention(recipe, this_machine()))


def for_evaluation(recipe: Recipe, adapter: Path) -> Any:
    """The base with the run's adapter as "default" and, for a continued DPO/KTO/GRPO run, the parent's adapter
    as the reference (REFERENCE_ADAPTER), so that tuned, reference and base are one model with three settings."""
    from peft import PeftModel

    from finetune.lineage import parent_of
    from finetune.modeling import fit_to_adapter

    base = base_model(recipe)
    fit_to_adapter(base, adapter)  # a run that added tokens (data.add_special_tokens): rows for them
    model = PeftModel.from_pretrained(base, adapter)
    parent = parent_of(recipe) if recipe.train.method != "sft" else None
    if parent is not None:
        model.load_adapter(parent.adapter, adapter_name=REFERENCE_ADAPTER)
        model.set_adapter("default")
    return model


def saved_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template saved with the adapter (or merged model): what training rendered with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def chat_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The saved tokenizer, refused without a chat template (a conversation could not be rendered), padded."""
    tokenizer = saved_tokenizer(directory)
    if tokenizer.chat_template is None:
        raise UserError(f"{directory}: the saved tokenizer has no chat template, so a conversation cannot be rendered")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
