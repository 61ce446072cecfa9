"""Supervised fine-tuning through TRL's SFTTrainer: the hooks `finetune.train` calls for `train.method: sft`.

The rows are rendered by the chat template and masked by `finetune.data` (only the assistant's
tokens are trained, unless `data.train_on: all`); the trainer may pack them or batch them
padding-free (the `speed` decisions). A fresh adapter is trained on the base model (with
`model.from_run`, on the parent's base, with its LoRA settings and template), and the held-out
comparison is tuned against base: SFT has no reference model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import SFTConfig, SFTTrainer

from finetune.data import PreparedData
from finetune.errors import DataError
from finetune.modeling import lora_config, resolve_targets
from finetune.recipe.schema import Recipe
from finetune.trainer import SafeTraining, build

if TYPE_CHECKING:
    from finetune.runs import RunDir
    from finetune.scoring import Comparison
    from finetune.speed import Speed
    from finetune.summary import EvalSummary

# the hooks finetune.train calls
__all__ = ["BEST", "PACKABLE", "compare", "config", "evaluate", "figures", "make_trainer", "policy", "prepare"]

BEST = ("eval_loss", False)  # in-training evaluation keeps the adapter with the lowest held-out loss
PACKABLE = True  # rows may be packed or batched padding-free (`speed`); other methods batch their own pairs and groups


def prepare(recipe: Recipe, tokenizer: Any) -> PreparedData:
    from finetune.data.stream import prepare_training_data

    return prepare_training_data(recipe, tokenizer)


def policy(recipe: Recipe, model: Any) -> tuple[Any, list[str], Any]:
    """(model, LoRA target modules, peft_config): always a new adapter, which TRL adds to the base."""
    targets = resolve_targets(recipe, model)
    return model, targets, lora_config(recipe, targets)


def config(recipe: Recipe, common: dict[str, Any], max_length: int, speed: Speed) -> SFTConfig:
    """TRL's SFTConfig: the shared training arguments, the speed decisions, every option TRL would default set here."""
    return SFTConfig(
        **common,
        use_liger_kernel=speed.liger_kernel,
        # prepare_data has cut every row to max_seq_length already; TRL refuses padding-free with its own cut
        max_length=None if speed.padding_free and not speed.packing else max_length,
        padding_free=speed.padding_free,
        packing=speed.packing,
        packing_strategy="bfd",
        ignore_data_skip=any(s.streaming for s in recipe.data.train),  # a stream resumes from its saved state
    )


class FinetuneSFTTrainer(SafeTraining, SFTTrainer):
    """TRL's SFTTrainer on our tokenized and masked rows, with SafeTraining; a streamed training set
    (data/stream.py) is read through `stream.Tracked`, whose position each checkpoint keeps."""

    _resume_from: str | None = None
    _tracked: Any = None

    def train(self, resume_from_checkpoint: str | None = None, *args: Any, **kwargs: Any) -> Any:
        self._resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self) -> Any:
        """A stream starts where the checkpoint resumed from left it (`ignore_data_skip`: transformers does not
        also skip batches by reading them)."""
        from datasets import IterableDataset

        if not isinstance(self.train_dataset, IterableDataset):
            return super().get_train_dataloader()
        from finetune.data.stream import Tracked, load_position

        if self.accelerator.num_processes > 1:
            raise DataError("data.train[].streaming: a stream trains in one process; run without a distributed launch")
        resume = self._resume_from
        position = load_position(resume, self._rows_trained_at_resume())
        self._tracked = Tracked(
            self.train_dataset, position, (lambda: self._load_rng_state(resume)) if resume else None
        )
        return self._get_dataloader(dataset=self._tracked, description="Training", batch_size=self._train_batch_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)  # fmt: skip

    def _rows_per_step(self) -> int:
        return self._train_batch_size * self.args.gradient_accumulation_steps

    def _rows_trained_at_resume(self) -> int:
        if self._resume_from is None:
            return 0
        state = json.loads((Path(self._resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
        return state["global_step"] * self._rows_per_step()

    def _save_rng_state(self, output_dir: str) -> None:
        """Beside the RNG states, inside the checkpoint still being staged: the stream's position after the rows
        the saved steps trained (every micro-batch of an endless stream is full)."""
        super()._save_rng_state(output_dir)
        if self._tracked is not None and self.args.should_save:
            from finetune.data.stream import save_position

            save_position(self._tracked, self.state.global_step * self._rows_per_step(), output_dir)


def make_trainer(
    recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, args: SFTConfig, peft_config: Any, callbacks: list
) -> FinetuneSFTTrainer:
    """Length-grouped batches (`data.group_by_length`) except when packed: a pack has no length of its own."""
    return build(FinetuneSFTTrainer, model, tokenizer, data, args, peft_config, callbacks,
                 loraplus_lr_ratio=recipe.train.loraplus_lr_ratio,
                 group_by_length=recipe.data.group_by_length and not args.packing)  # fmt: skip


def compare(recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, has_reference: bool = False) -> Comparison:
    """Held-out loss and `eval.metrics` of the tuned adapter and (`eval.compare_base`) the base."""
    from finetune.scoring import compare as compare_models

    e = recipe.eval
    return compare_models(
        model, tokenizer, data.eval, data.eval_samples, list(e.metrics), e.max_new_tokens, e.batch_size,
        with_base=e.compare_base, limit=e.limit, options=e, kept=data.eval_kept,
    )  # fmt: skip


def figures(recipe: Recipe) -> list[str]:
    """The tuned figures `compare` reports: held-out loss and perplexity, then the generation metrics."""
    from finetune.recipe.schema import LOSS_METRICS
    from finetune.scoring import metric_names

    return [*LOSS_METRICS, *metric_names(list(recipe.eval.metrics))]


def evaluate(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PreparedData) -> EvalSummary | None:
    """The held-out comparison and the `eval.harness` tasks, written to eval/; None without held-out data."""
    if data.eval is None and not data.eval_samples:
        return None
    e = recipe.eval
    return write_comparison(recipe, run, compare(recipe, model, tokenizer, data), e.compare_base, e.limit)


def write_comparison(
    recipe: Recipe, run: RunDir, comparison: Comparison, with_base: bool, limit: int | None, out: Path | None = None
) -> EvalSummary:
    """Run the `eval.harness` tasks, if any, and write everything to `out` (default eval/); returns the summary.

    Shared by `finetune eval` and the end of training, so that both write the same files.
    """
    from finetune.runs import write_eval

    summary, harness = comparison.summary(), None
    if recipe.eval.harness:
        from finetune.harness import run_harness, summarize

        harness = run_harness(recipe, run.adapter, with_base, limit)
        summary.harness = summarize(harness)
    write_eval(run, summary.to_dict(), comparison.examples(), harness, out)
    return summary
