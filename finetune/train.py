"""`finetune train`: a validated recipe -> a trained LoRA/QLoRA adapter in a run directory.

Reads top to bottom: claim the run directory, record provenance, prepare data, load the
model, train with TRL's SFTTrainer, save the adapter atomically, compare tuned vs base on
held-out data, mark the run completed. Training itself is TRL's; we only configure it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.data import PreparedData, prepare_data
from finetune.evaluate import Comparison, compare
from finetune.modeling import load_model, load_tokenizer, lora_config, resolve_dtype, resolve_targets
from finetune.recipe import Recipe
from finetune.runs import Manifest, RunDir, atomic_dir, now, write_json_atomic, write_recipe

if TYPE_CHECKING:
    from transformers import TrainerCallback

log = logging.getLogger("finetune")


@dataclass
class TrainResult:
    run_dir: str
    adapter_dir: str
    steps: int
    train_loss: float | None
    seconds: float
    targets: list[str]
    trainable_params: int
    total_params: int
    data: dict[str, Any]
    eval: dict[str, Any] | None
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers in this process

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def train(recipe: Recipe, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the recipe's adapter; writes the run directory and returns the figures."""
    run = RunDir(recipe.run_dir)
    run.create(overwrite)
    write_recipe(run, recipe)
    manifest = Manifest.start(run, recipe)
    try:
        result = _train(recipe, run, manifest, progress)
    except KeyboardInterrupt:
        manifest.update(status="interrupted", finished=now())
        raise
    except BaseException as e:
        manifest.update(status="failed", finished=now(), error=f"{type(e).__name__}: {e}")
        raise
    manifest.update(status="completed", finished=now())
    return result


def _train(recipe: Recipe, run: RunDir, manifest: Manifest, progress: bool) -> TrainResult:
    import datasets
    import transformers

    # Deprecations inside transformers/PEFT that a user cannot act on.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    transformers.set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    manifest.update(data=data.stats.to_dict())
    model = load_model(recipe)
    targets = resolve_targets(recipe, model)
    if recipe.quantization.method != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainer = _trainer(recipe, run, model, tokenizer, data, targets, progress)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    manifest.update(lora={"targets": targets, "trainable_params": trainable, "total_params": total})
    output = trainer.train()
    with atomic_dir(run.adapter) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    comparison = _evaluate(recipe, run, trainer.model, tokenizer, data)
    summary = comparison.summary() if comparison else None
    manifest.update(steps=output.global_step, train_loss=output.training_loss, eval=summary)
    return TrainResult(
        run_dir=str(run.root),
        adapter_dir=str(run.adapter),
        steps=output.global_step,
        train_loss=output.training_loss,
        seconds=time.perf_counter() - started,
        targets=targets,
        trainable_params=trainable,
        total_params=total,
        data=data.stats.to_dict(),
        eval=summary,
        model=trainer.model,
    )


def sft_config(recipe: Recipe, run: RunDir, max_length: int) -> Any:
    """TRL's SFTConfig from the recipe; every option TRL would otherwise default is set here explicitly."""
    import torch
    from trl import SFTConfig

    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run.checkpoints),
        seed=recipe.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        logging_steps=t.logging_every,
        logging_first_step=True,
        report_to=list(t.report_to) or "none",
        max_length=max_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _trainer(
    recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PreparedData, targets: list[str], progress: bool
) -> Any:
    from transformers import PrinterCallback
    from trl import SFTTrainer

    callbacks: list[TrainerCallback] = [_metrics_callback(run.metrics)]
    if progress:
        callbacks.append(_progress_callback())
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, run, data.stats.max_seq_length),
        train_dataset=data.train,
        eval_dataset=data.eval if recipe.train.eval_every else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe, targets),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def _evaluate(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PreparedData) -> Comparison | None:
    """Held-out comparison of tuned vs base, written to eval/; None without held-out data."""
    if data.eval is None and not data.eval_samples:
        return None
    e = recipe.eval
    comparison = compare(
        model, tokenizer, data.eval, data.eval_samples, list(e.metrics), e.max_new_tokens, e.batch_size,
        with_base=e.compare_base, limit=e.limit,
    )  # fmt: skip
    with atomic_dir(run.eval) as tmp:
        write_json_atomic(tmp / "summary.json", comparison.summary())
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in comparison.examples())
        (tmp / "examples.jsonl").write_text(lines, encoding="utf-8")
    return comparison


def _metrics_callback(path: Path) -> TrainerCallback:
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Appends every log (train and eval) to metrics.jsonl, with tokens/s between logs."""

        def __init__(self) -> None:
            self.last = (time.perf_counter(), 0.0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            t, tokens = time.perf_counter(), float(logs.get("num_tokens", self.last[1]))
            if tokens > self.last[1]:
                logs["tokens_per_s"] = (tokens - self.last[1]) / max(t - self.last[0], 1e-9)
                self.last = (t, tokens)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": now(), **logs}) + "\n")

    return MetricsJsonl()


def _progress_callback() -> TrainerCallback:
    from finetune.progress import TrainProgress

    return TrainProgress()
