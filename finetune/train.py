"""`finetune train`: a validated recipe -> a trained LoRA/QLoRA adapter in a run directory.

Reads top to bottom: claim the run directory (or find where to resume), record provenance,
prepare data, load the model, train with TRL's SFTTrainer, keep the best held-out adapter,
compare tuned vs base on held-out data, mark the run completed. Training itself is TRL's; we
configure it and make it safe to interrupt.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.data import PreparedData, prepare_data
from finetune.errors import RunDirError, TrainingInterrupted, TrainingStopped, UserError
from finetune.evaluate import compare, write_comparison
from finetune.harness import check as check_harness
from finetune.modeling import (
    load_model,
    load_tokenizer,
    lora_config,
    process_state,
    quiet_libraries,
    resolve_dtype,
    resolve_targets,
    weight_files,
)
from finetune.recipe import Recipe
from finetune.runs import Manifest, RunDir, atomic_dir, file_sha256, now, write_recipe
from finetune.secrets import redact_text
from finetune.speed import Speed, decide

# Keys that may change between a run and its --resume: they do not change what is trained.
RESUMABLE_CHANGES = ("eval.", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.logging_every",
                     "train.report_to", "output_dir")  # fmt: skip


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
    best_step: int | None
    data: dict[str, Any]
    eval: dict[str, Any] | None
    resumed_from: int | None = None
    main_process: bool = True  # False in the other processes of a distributed run: they report nothing
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers in this process

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def train(
    recipe: Recipe,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the recipe's adapter into its run directory; `resume` continues from the newest checkpoint.

    `on_eval(step, held_out_loss)` is called after each held-out evaluation; raising `TrainingStopped`
    from it ends the run as `stopped` (a sweep prunes hopeless trials this way).

    Under `accelerate launch` or `torchrun` every process runs this; all check, only the main
    process writes the run directory, manifest, metrics and report.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    state = process_state()
    run = RunDir(recipe.run_dir)
    checkpoint = find_resume_point(run, recipe) if resume and run.manifest.exists() else None
    if checkpoint is None:
        run.refuse_existing(overwrite)
    check_harness(recipe)  # lm-eval installed and every task found, before hours of training
    state.wait_for_everyone()
    if state.is_main_process:
        _claim(run, recipe, checkpoint, overwrite)
    state.wait_for_everyone()
    manifest = Manifest.load(run) if state.is_main_process else Manifest.disabled(run)
    try:
        result = _train(recipe, run, manifest, checkpoint, progress, on_eval)
    except TrainingStopped as e:
        manifest.update(status="stopped", finished=now(), error=str(e))
        raise
    except TrainingInterrupted as e:
        manifest.update(status="interrupted", finished=now(), error=str(e))
        raise
    except KeyboardInterrupt:
        manifest.update(status="interrupted", finished=now())
        raise
    except BaseException as e:
        manifest.update(status="failed", finished=now(), error=redact_text(f"{type(e).__name__}: {e}"))
        raise
    else:
        manifest.update(status="completed", finished=now())
    finally:
        if state.is_main_process:
            _write_report(run)
    return result


def _write_report(run: RunDir) -> None:
    """report.html at every end of a run, failed or not; a report problem never hides the run's own."""
    from finetune.report import write_report

    try:
        write_report(run)
    except Exception as e:
        warnings.warn(f"could not write {run.root / 'report.html'}: {e}", stacklevel=2)


def _claim(run: RunDir, recipe: Recipe, checkpoint: Path | None, overwrite: bool) -> None:
    """Main process only: a fresh run directory, or the resumed one cleaned up to its checkpoint."""
    from finetune.trainer import STAGING

    if checkpoint is None:
        run.create(overwrite)
        write_recipe(run, recipe)
        Manifest.start(run, recipe)
        return
    staging = run.checkpoints / STAGING
    if staging.exists():
        warnings.warn(f"removing partial checkpoint(s) in {staging} left by an interrupted save", stacklevel=2)
        shutil.rmtree(staging)
    _truncate_metrics(run.metrics, checkpoint_step(checkpoint))
    manifest = Manifest.load(run)
    attempts = [*manifest.data.get("resumes", []), {"from_step": checkpoint_step(checkpoint), "at": now()}]
    manifest.update(status="running", finished=None, error=None, resumes=attempts)


def find_resume_point(run: RunDir, recipe: Recipe) -> Path:
    """The newest complete checkpoint of a run whose recipe still matches (a read-only check)."""
    from finetune.trainer import complete_checkpoints

    previous = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) if run.recipe.exists() else None
    if previous is None:
        raise RunDirError(f"{run.root} has no recipe.yaml: not a finetune run; use --overwrite to start afresh")
    changed = [k for k in _differing_keys(previous, recipe.resolved()) if not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise RunDirError(
            f"cannot resume {run.root}: the recipe changed in {', '.join(changed)}; "
            "restore those values, or start afresh with --overwrite"
        )
    checkpoints = complete_checkpoints(run.checkpoints)
    if not checkpoints:
        status = json.loads(run.manifest.read_text()).get("status")
        hint = "it is already completed" if status == "completed" else "set train.save_every to checkpoint"
        raise RunDirError(
            f"{run.root} has no complete checkpoint to resume from ({hint}); use --overwrite to start afresh"
        )
    return checkpoints[-1]


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logs past the checkpoint, so that the resumed run's curve continues without a double."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _train(
    recipe: Recipe,
    run: RunDir,
    manifest: Manifest,
    checkpoint: Path | None,
    progress: bool,
    on_eval: Callable[[int, float], None] | None,
) -> TrainResult:
    import torch
    import transformers

    from finetune.trainer import BestAdapter, EvaluateAtEnd, ReportEval, StopOnSignal

    state = process_state()
    main = state.is_main_process
    quiet_libraries()
    _trackers_write_into(run, recipe)
    started = time.perf_counter()
    transformers.set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    with state.main_process_first():  # the main process fills the preprocessing cache, the others read it
        data = prepare_data(recipe, tokenizer)
    manifest.update(data=data.stats.to_dict())
    speed = decide(recipe)
    manifest.update(speed=speed.to_dict())
    model = load_model(recipe)
    if main:
        manifest.update(base_model={**manifest.data["base_model"], **weight_files(recipe, model)})
    targets = resolve_targets(recipe, model)
    if recipe.quantization.method != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=speed.gradient_checkpointing)

    def save_best(step: int, loss: float) -> None:
        manifest.update(best_step=step, best_eval_loss=loss)
        if main:
            _save_adapter(run, trainer.model, tokenizer)

    best = BestAdapter(save_best, manifest.data.get("best_eval_loss") or math.inf)
    stop = StopOnSignal()
    callbacks = [best, stop] + ([EvaluateAtEnd()] if data.eval is not None else [])
    callbacks += [ReportEval(on_eval)] if on_eval is not None else []
    trainer = _trainer(recipe, run, model, tokenizer, data, speed, targets, callbacks, progress and main, main)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    manifest.update(lora={"targets": targets, "trainable_params": trainable, "total_params": total})
    t = recipe.train
    manifest.update(processes=state.num_processes, global_batch=t.batch_size * t.grad_accum * state.num_processes)
    _check_disk_space(run, recipe, trainable)
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        raise RuntimeError(_oom_advice(recipe, speed)) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RuntimeError(f"disk full while writing to {run.root}: {e}; no partial checkpoint was kept") from e
        raise
    finally:
        stop.uninstall()
    if stop.received is not None:
        raise TrainingInterrupted(
            f"stopped by signal {stop.received} at step {trainer.state.global_step}; checkpoint saved; "
            "continue with: finetune train RECIPE --resume"
        )
    if main and not run.adapter.exists():  # no held-out data: the final adapter is the one
        _save_adapter(run, trainer.model, tokenizer)
    state.wait_for_everyone()
    if manifest.data.get("best_step") not in (None, trainer.state.global_step):
        _load_adapter_weights(trainer.model, run.adapter)
    manifest.update(tokenizer_sha256=file_sha256(run.adapter / "tokenizer.json"),
                    chat_template_sha256=file_sha256(run.adapter / "chat_template.jinja"))  # fmt: skip
    summary = _evaluate(recipe, run, trainer.model, tokenizer, data) if main else None
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
        best_step=manifest.data.get("best_step"),
        data=data.stats.to_dict(),
        eval=summary,
        resumed_from=checkpoint_step(checkpoint) if checkpoint else None,
        main_process=main,
        model=trainer.model,
    )


def _trackers_write_into(run: RunDir, recipe: Recipe) -> None:
    """Offline trackers log inside the run directory unless the user points them elsewhere."""
    if "tensorboard" in recipe.train.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.root / "tensorboard"))
    if "mlflow" in recipe.train.report_to:
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a plain file store: offline, no database server
            os.environ["MLFLOW_TRACKING_URI"] = (run.root / "mlruns").resolve().as_uri()
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", recipe.name)


def _save_adapter(run: RunDir, model: Any, tokenizer: Any) -> None:
    with atomic_dir(run.adapter) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))


def _check_disk_space(run: RunDir, recipe: Recipe, trainable: int) -> None:
    """Refuse to start when the run's checkpoints and adapters clearly cannot fit on its disk.

    A checkpoint holds the adapter (4 bytes/param) and AdamW's two moments (8 bytes/param);
    `keep_checkpoints` of them plus one being written, and two adapters (best and staging).
    """
    checkpoints = recipe.train.keep_checkpoints + 1 if recipe.train.save_every else 1
    need = trainable * (12 * checkpoints + 8) + 64 * 2**20
    free = shutil.disk_usage(run.root).free
    if free < need:
        raise RunDirError(
            f"{run.root}: {free / 2**30:.2f} GiB free, but checkpoints and adapters need about "
            f"{need / 2**30:.2f} GiB; free space or lower train.keep_checkpoints"
        )


def _oom_advice(recipe: Recipe, speed: Speed) -> str:
    t, d = recipe.train, recipe.data
    return (
        f"out of memory at batch_size {t.batch_size}, max_seq_length {d.max_seq_length}, "
        f"gradient_checkpointing {str(speed.gradient_checkpointing).lower()}, "
        f"quantization {recipe.quantization.method}. "
        "Try, in order: --set train.batch_size=<half> with train.grad_accum=<double> (same global batch); "
        "--set train.gradient_checkpointing=true; a lower data.max_seq_length; --set quantization.method=nf4; "
        "and see `finetune plan` for the memory estimate per component."
    )


def sft_config(recipe: Recipe, run: RunDir, max_length: int, speed: Speed) -> Any:
    """TRL's SFTConfig from the recipe; every option TRL would otherwise default is set here explicitly."""
    import torch
    from trl import SFTConfig

    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run.checkpoints),
        run_name=recipe.name,
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
        activation_checkpointing=speed.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if speed.gradient_checkpointing else None,
        use_liger_kernel=speed.liger_kernel,
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
        logging_nan_inf_filter=False,
        report_to=list(t.report_to) or "none",
        max_length=max_length,
        packing=speed.packing,
        packing_strategy="bfd",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _trainer(
    recipe: Recipe,
    run: RunDir,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    speed: Speed,
    targets: list[str],
    callbacks: list[Any],
    progress: bool,
    main: bool,
) -> Any:
    from transformers import PrinterCallback

    from finetune.trainer import FinetuneTrainer, MetricsJsonl

    callbacks = [MetricsJsonl(run.metrics), *callbacks] if main else callbacks
    if progress:
        from finetune.progress import TrainProgress

        callbacks.append(TrainProgress())
    trainer = FinetuneTrainer(
        model=model,
        args=sft_config(recipe, run, data.stats.max_seq_length, speed),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe, targets),
        callbacks=callbacks,
        group_by_length=recipe.data.group_by_length and not speed.packing,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def _evaluate(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, data: PreparedData) -> dict[str, Any] | None:
    """Held-out comparison of tuned vs base and the eval.harness tasks, in eval/; None without held-out data."""
    if data.eval is None and not data.eval_samples:
        return None
    e = recipe.eval
    comparison = compare(
        model, tokenizer, data.eval, data.eval_samples, list(e.metrics), e.max_new_tokens, e.batch_size,
        with_base=e.compare_base, limit=e.limit,
    )  # fmt: skip
    return write_comparison(recipe, run, comparison, e.compare_base, e.limit)
