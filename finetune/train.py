"""`finetune train`: a validated recipe -> a trained LoRA/QLoRA adapter in a run directory.

Reads top to bottom: claim the run directory (or find where to resume), record provenance,
prepare data, load the model, train with the method's TRL trainer, keep the best held-out adapter,
evaluate on held-out data, mark the run completed. The steps are the same for every method (SFT,
DPO, KTO, GRPO): what differs is the method's module (`finetune.methods`). Training itself is
TRL's; we configure it and make it safe to interrupt.
It is ~660 lines because the distributed launch and the resume search share the run lock with the
steps above; each is a short named function.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from finetune import lora_init, lora_layers, methods, sharding
from finetune.errors import (
    LaunchError,
    RewardFailed,
    RunDirError,
    TrainingInterrupted,
    TrainingStopped,
    UserError,
    WriteError,
)
from finetune.files import atomic_dir, file_sha256
from finetune.harness import check as check_harness
from finetune.lineage import check_same_weights, continue_parent, parent_record
from finetune.lock import RunLock, describe
from finetune.machine import Machine, process_state, resolve_dtype, this_machine
from finetune.modeling import (
    load_model,
    load_tokenizer,
    prepare_quantized,
    quiet_libraries,
    tied_output_note,
    train_new_tokens,
    weight_files,
)
from finetune.recipe.preflight import preflight
from finetune.recipe.schema import Recipe, resumable_keys
from finetune.runs import Manifest, RunDir, now, process_record, recipe_differences, run_seconds, write_recipe
from finetune.secrets import redact_text
from finetune.speed import (
    Speed,
    decide_checkpointing,
    decide_liger,
    decide_packing,
    decide_padding_free,
    model_attention,
    needs_peak,
)
from finetune.summary import EvalPoint, EvalSummary
from finetune.tracking import log_results

LAUNCHED = "FINETUNE_LAUNCHED"  # set in the processes `train.distributed` launches


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
    eval: EvalSummary | None
    resumed_from: int | None = None
    main_process: bool = True  # False in the other processes of a distributed run: they report nothing
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers in this process

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "eval")}
        return {**out, "eval": None if self.eval is None else self.eval.to_dict()}


def train(
    recipe: Recipe,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[EvalPoint], None] | None = None,
) -> TrainResult:
    """Train the recipe's adapter into its run directory; `resume` continues from the newest checkpoint.

    `on_eval(point)` is called after each held-out evaluation with the figure the method ranks adapters
    by (the loss; GRPO's reward); raising `TrainingStopped` from it ends the run as `stopped` (a sweep
    prunes hopeless trials this way).

    Under `accelerate launch` or `torchrun` every process runs this; all check, only the main
    process writes the run directory, manifest, metrics and report. With `train.distributed`
    (and not yet launched) it launches those processes itself and waits for them.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if recipe.train.distributed and not launched():
        preflight(recipe)
        return _launch(recipe, overwrite, resume, progress)
    recipe = continue_parent(recipe)  # model.from_run: base, adapter settings and template from the parent run
    preflight(recipe)  # metric modules, the model directory's files: before claiming anything
    check_harness(recipe)  # lm-eval installed and every task found, before hours of training
    state = process_state()
    if not state.is_main_process:
        return _train_run(recipe, overwrite, resume, progress, on_eval)
    with RunLock(recipe.run_dir) as lock:  # a second train on this directory is refused, naming this one
        if lock.stale:
            warnings.warn(f"took over the lock left by a killed run ({describe(lock.stale)})", stacklevel=2)
        return _train_run(recipe, overwrite, resume, progress, on_eval)


def _train_run(
    recipe: Recipe, overwrite: bool, resume: bool, progress: bool, on_eval: Callable[[EvalPoint], None] | None
) -> TrainResult:
    state = process_state()
    run = RunDir(recipe.run_dir)
    checkpoint, replace = _start_point(run, recipe, resume, overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        _claim(run, recipe, checkpoint, replace, resume)
    state.wait_for_everyone()
    manifest = Manifest.load(run) if state.is_main_process else Manifest.disabled(run)
    try:
        result = _train(recipe, run, manifest, checkpoint, progress, on_eval)
    except TrainingStopped as e:
        _mark(manifest, status="stopped", finished=now(), error=str(e))
        raise
    except TrainingInterrupted as e:
        _mark(manifest, status="interrupted", finished=now(), error=str(e))
        raise
    except KeyboardInterrupt:
        _mark(manifest, status="interrupted", finished=now())
        raise
    except BaseException as e:
        _mark(manifest, status="failed", finished=now(), error=redact_text(f"{type(e).__name__}: {e}"))
        raise
    else:
        manifest.update(status="completed", finished=now())
        if state.is_main_process:
            log_results(recipe, run)  # our held-out figures, recipe, manifest and lineage to the trackers
    finally:
        if state.is_main_process:
            _write_report(run)
    return result


def launched() -> bool:
    """Already a process of a distributed launch (ours, torchrun's or accelerate's)."""
    return any(v in os.environ for v in (LAUNCHED, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE"))


def _launch(recipe: Recipe, overwrite: bool, resume: bool, progress: bool) -> TrainResult:
    """Run `finetune train` on the same recipe file and overrides under `accelerate launch --config_file
    train.distributed`; the launched main process reports, this one returns the run's figures from its manifest."""
    import subprocess
    import sys

    if recipe.source is None:
        raise UserError("train.distributed: the launched processes re-read the recipe, so load it from a file")
    run = RunDir(recipe.run_dir)
    if not resume:  # refuse here, once, rather than in every launched process
        run.refuse_existing(overwrite)
    flags = [f"--set={o}" for o in recipe.overrides] + ["--resume"] * resume + ["--overwrite"] * overwrite
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", recipe.train.distributed,
               "-m", "finetune.cli", "train", str(recipe.source.path), *flags, *([] if progress else ["--json"])]  # fmt: skip
    if progress:
        print(f"launching: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    code = subprocess.call(command, env={**os.environ, LAUNCHED: "1"})
    if code != 0:
        raise LaunchError(code)
    return _result_of(run)


def _result_of(run: RunDir) -> TrainResult:
    """A finished run's figures, read back from its manifest (for the process that launched it)."""
    m = Manifest.load(run).data
    lora = m.get("lora") or {}
    return TrainResult(
        run_dir=str(run.root),
        adapter_dir=str(run.adapter),
        steps=m.get("steps") or 0,
        train_loss=m.get("train_loss"),
        seconds=run_seconds(m) or 0.0,
        targets=lora.get("targets") or [],
        trainable_params=lora.get("trainable_params") or 0,
        total_params=lora.get("total_params") or 0,
        best_step=m.get("best_step"),
        data=m.get("data") or {},
        eval=EvalSummary.from_dict(m.get("eval")),
        main_process=False,  # the launched main process has reported it
    )


def _mark(manifest: Manifest, **fields: Any) -> None:
    """Record how the run ended; on a full disk this write fails too, and must not hide the run's own error."""
    try:
        manifest.update(**fields)
    except (OSError, WriteError) as e:
        warnings.warn(f"could not record the run's status in {manifest.run.manifest}: {e}", stacklevel=2)


def _write_report(run: RunDir) -> None:
    """report.html at every end of a run, failed or not; a report problem never hides the run's own."""
    from finetune.report import write_report

    try:
        write_report(run)
    except Exception as e:
        warnings.warn(f"could not write {run.root / 'report.html'}: {e}", stacklevel=2)


def _start_point(run: RunDir, recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path | None, bool]:
    """(checkpoint to resume from, whether an existing directory is replaced); refuses what would lose work.

    `--resume` continues from the newest complete checkpoint; without one (killed before its first
    save, or failed before its first step) it starts the run again from step 0, so that a requeued
    `finetune train RECIPE --resume` always makes progress.
    """
    command = _command(recipe)
    if not (resume and run.manifest.exists()):
        run.refuse_existing(overwrite, command)
        if not overwrite and run.replaceable():
            _say_replaced(run)
            return None, True
        return None, overwrite
    run.refuse_resume()
    if run.replaceable():  # nothing was trained: the recipe may have been fixed since
        _say_replaced(run)
        return None, True
    checkpoint = find_resume_point(run, recipe)
    if checkpoint is None:
        steps = run.steps_logged()
        lost = f"the {steps} step(s) it did are lost" if steps else "it had not finished a step"
        why = f"train.save_every is {recipe.train.save_every}" if recipe.train.save_every else "train.save_every is off"
        warnings.warn(f"{run.root} has no complete checkpoint ({why}; {lost}): starting it from step 0", stacklevel=3)
    return checkpoint, checkpoint is None


def _say_replaced(run: RunDir) -> None:
    manifest = run.read_manifest() or {}
    error = f" ({manifest['error']})" if manifest.get("error") else ""
    warnings.warn(f"replacing {run.root}: its last attempt stopped before its first step{error}", stacklevel=3)


def _command(recipe: Recipe) -> str | None:
    """The `finetune train` command that was run (recipe path and --set options), for messages that suggest one."""
    return recipe.source.command() if recipe.source else None


def _claim(run: RunDir, recipe: Recipe, checkpoint: Path | None, replace: bool, resume: bool) -> None:
    """Main process only: a fresh run directory, or the resumed one cleaned up to its checkpoint."""
    from finetune.trainer import STAGING

    if checkpoint is None:
        previous = run.read_manifest() if replace and resume else None  # restarted from step 0 by --resume
        run.create(replace)
        write_recipe(run, recipe)
        manifest = Manifest.start(run, recipe)
        manifest.update(command=_recorded_command(recipe), parent=parent_record(recipe))
        if previous is not None:
            attempts = [*previous.get("resumes", []), {"from_step": 0, "at": now()}]
            manifest.update(resumes=attempts)
        return
    run.check_writable()
    staging = run.checkpoints / STAGING
    if staging.exists():
        if any(staging.iterdir()):
            warnings.warn(f"removing partial checkpoint(s) in {staging} left by an interrupted save", stacklevel=2)
        shutil.rmtree(staging)
    _truncate_metrics(run.metrics, checkpoint_step(checkpoint))
    manifest = Manifest.load(run)
    attempts = [*manifest.data.get("resumes", []), {"from_step": checkpoint_step(checkpoint), "at": now()}]
    manifest.update(status="running", finished=None, error=None, resumes=attempts, process=process_record(),
                    command=_recorded_command(recipe))  # fmt: skip


def _recorded_command(recipe: Recipe) -> dict[str, str] | None:
    """What `runs show` and `merge` suggest to continue the run: the command and the directory it ran from."""
    command = _command(recipe)
    return {"resume": f"{command} --resume", "cwd": str(Path.cwd())} if command else None


def find_resume_point(run: RunDir, recipe: Recipe) -> Path | None:
    """The newest complete checkpoint of a run whose recipe still matches (a read-only check); None if none."""
    try:
        previous = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) if run.recipe.exists() else None
    except OSError as e:
        raise RunDirError(f"cannot read {run.recipe}: {e.strerror}") from None
    if previous is None:
        raise RunDirError(f"{run.root} has no recipe.yaml: not a finetune run; use --overwrite to start afresh")
    resumable = resumable_keys()  # marked on the schema: they do not change what is trained
    differing = recipe_differences([previous, recipe.resolved()])
    changed = [k for k in differing if not any(k == r or k.startswith(f"{r}.") for r in resumable)]
    if changed:
        raise RunDirError(
            f"cannot resume {run.root}: the recipe changed in {', '.join(changed)}; "
            "restore those values, or start afresh with --overwrite"
        )
    checkpoints = run.complete_checkpoints()
    return checkpoints[-1] if checkpoints else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logs past the checkpoint, so that the resumed run's curve continues without a double."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill mid-append counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


@dataclass
class Setup:
    """What `_setup` builds before the first step, for the steps after it."""

    method: ModuleType  # the recipe's train.method, whose hooks (finetune.methods) say what differs per method
    tokenizer: Any
    data: Any  # the method's prepared data: PreparedData, PreferenceData or PromptData
    machine: Machine
    speed: Speed
    model: Any
    targets: list[str]
    peft_config: Any


def _train(
    recipe: Recipe,
    run: RunDir,
    manifest: Manifest,
    checkpoint: Path | None,
    progress: bool,
    on_eval: Callable[[EvalPoint], None] | None,
) -> TrainResult:
    """One process's part of the run, in named steps: set up, build the trainer, train, keep the best adapter,
    evaluate, record. The same for every method; what differs is the method's (`setup.method`)."""
    from finetune.trainer import StopOnSignal

    started = time.perf_counter()
    main = process_state().is_main_process
    setup = _setup(recipe, run, manifest, checkpoint)
    stop = StopOnSignal()
    trainer = _make_trainer(recipe, run, manifest, setup, stop, progress and main, on_eval)
    trainable, total = _record_trainer(recipe, run, manifest, trainer, setup.targets)
    output = _fit(recipe, run, trainer, checkpoint, setup.speed, stop)
    _keep_best_adapter(recipe, run, manifest, trainer, setup.tokenizer)
    summary = setup.method.evaluate(recipe, run, trainer.model, setup.tokenizer, setup.data) if main else None
    manifest.update(steps=output.global_step, train_loss=output.training_loss, eval=summary and summary.to_dict())
    return TrainResult(
        run_dir=str(run.root),
        adapter_dir=str(run.adapter),
        steps=output.global_step,
        train_loss=output.training_loss,
        seconds=time.perf_counter() - started,
        targets=setup.targets,
        trainable_params=trainable,
        total_params=total,
        best_step=manifest.data.get("best_step"),
        data=setup.data.stats.to_dict(),
        eval=summary,
        resumed_from=checkpoint_step(checkpoint) if checkpoint else None,
        main_process=main,
        model=trainer.model,
    )


def _setup(recipe: Recipe, run: RunDir, manifest: Manifest, checkpoint: Path | None) -> Setup:
    """Everything before the first step: quiet libraries, trackers and the seed; the method's data; the model
    with its speed decisions; the adapter to train (the method's policy)."""
    import transformers

    quiet_libraries()
    _trackers_write_into(run, recipe)
    transformers.set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    base_vocabulary = len(tokenizer)  # data.add_special_tokens may add to it while the data is prepared
    method = methods.load(recipe.train.method)
    state = process_state()
    with state.main_process_first():  # the main process fills the preprocessing cache, the others read it
        data = method.prepare(recipe, tokenizer)
    manifest.update(data=data.stats.to_dict())
    checks = getattr(data.stats, "checks", None)  # every method's data is checked (data/checks.py, pair_checks.py)
    if checks and state.is_main_process:  # the one-line summary of the findings, before training
        print(checks["summary"], file=sys.stderr, flush=True)
    machine = this_machine()
    model, speed = _load_model(recipe, run, manifest, checkpoint, machine, data.stats.max_seq_length)
    model, targets, peft_config = method.policy(recipe, model)
    if len(tokenizer) > base_vocabulary:  # the schema keeps new tokens to a fresh SFT adapter (peft_config)
        new_ids = list(range(base_vocabulary, len(tokenizer)))
        record = train_new_tokens(recipe, model, peft_config, new_ids)
        manifest.update(new_tokens={"tokens": tokenizer.convert_ids_to_tokens(new_ids), **record})
    if peft_config is not None:  # a new adapter: patterns and blocks that would adapt nothing stop here
        lora_layers.check(recipe, model, peft_config)
    model, peft_config, init = lora_init.apply(recipe, run.root, model, peft_config, data, tokenizer,
                                               resumed=checkpoint is not None, main=state.is_main_process)  # fmt: skip
    if init is not None:
        manifest.update(lora_init=init)
    return Setup(method, tokenizer, data, machine, speed, model, targets, peft_config)


def _load_model(
    recipe: Recipe, run: RunDir, manifest: Manifest, checkpoint: Path | None, machine: Machine, seq_length: int
) -> tuple[Any, Speed]:
    """The base model, its weights recorded (and checked against a parent's), and every `auto` speed setting
    decided for it (a resumed run keeps the decisions its manifest recorded)."""
    main = process_state().is_main_process
    attention = model_attention(recipe, machine)
    liger = decide_liger(recipe.train.liger_kernel, machine)
    model = load_model(recipe, attention)
    recorded = (run.read_manifest() or {}).get("speed") if checkpoint is not None else None  # every process
    speed = _decide_speed(recipe, machine, attention, liger, model.config, seq_length, recorded)
    manifest.update(speed=speed.to_dict())
    if main:
        manifest.update(base_model={**manifest.data["base_model"], **weight_files(recipe, model)})
        check_same_weights(manifest.data.get("parent"), manifest.data["base_model"])
    if main and (note := tied_output_note(recipe, model)):
        warnings.warn(note, stacklevel=3)
    return prepare_quantized(recipe, model, speed.gradient_checkpointing), speed


def _make_trainer(
    recipe: Recipe,
    run: RunDir,
    manifest: Manifest,
    setup: Setup,
    stop: Any,
    progress: bool,
    on_eval: Callable[[EvalPoint], None] | None,
) -> Any:
    """The method's TRL trainer with the shared callbacks: metrics.jsonl, the best held-out adapter kept, the
    signal stop, a held-out evaluation at the last step, the caller's `on_eval`, the progress display."""
    from transformers import PrinterCallback

    from finetune.trainer import BestAdapter, EvaluateAtEnd, MetricsJsonl, ReportEval

    main = process_state().is_main_process
    metric, higher = setup.method.BEST  # what "best held-out" means for the method
    key = f"best_{metric}"

    def save_best(step: int, value: float) -> None:
        manifest.update(best_step=step, **{key: value})
        if main:
            _save_adapter(recipe, run, trainer.model, setup.tokenizer)

    at_end = setup.data.eval is not None and (metric == "eval_loss" or recipe.train.eval_every)  # GRPO's is generation
    callbacks = [BestAdapter(save_best, manifest.data.get(key), metric, higher), stop]
    callbacks += [EvaluateAtEnd()] if at_end else []
    callbacks += [ReportEval(on_eval, metric, higher)] if on_eval is not None else []
    callbacks = [MetricsJsonl(run.metrics), *callbacks] if main else callbacks
    if progress:
        from finetune.progress import TrainProgress

        callbacks.append(TrainProgress())
    common = training_arguments(recipe, run, setup.speed, setup.machine)
    args = setup.method.config(recipe, common, setup.data.stats.max_seq_length, setup.speed)
    trainer = setup.method.make_trainer(recipe, setup.model, setup.tokenizer, setup.data, args, setup.peft_config,
                                        callbacks)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    return trainer


def _record_trainer(
    recipe: Recipe, run: RunDir, manifest: Manifest, trainer: Any, targets: list[str]
) -> tuple[int, int]:
    """(trainable, total) parameters, recorded with the targets and the global batch; then the disk checked for
    the checkpoints they make, before the first step."""
    trainable, total = trainer.model.get_nb_trainable_parameters()
    ranks = lora_layers.summary(lora_layers.in_model(trainer.model))  # which modules got which rank
    manifest.update(lora={"targets": targets, "trainable_params": trainable, "total_params": total, "ranks": ranks})
    t = recipe.train
    lora_plus = (
        {"loraplus_lr_ratio": t.loraplus_lr_ratio, "lr_b": t.lr * t.loraplus_lr_ratio} if t.loraplus_lr_ratio else {}
    )
    manifest.update(optimizer={"name": t.optimizer, "lr": t.lr, **lora_plus})  # LoRA+: PEFT's groups, B at lr_b
    processes = process_state().num_processes
    manifest.update(processes=processes, global_batch=t.batch_size * t.grad_accum * processes)
    manifest.update(distributed=sharding.record(trainer.accelerator))  # FSDP asked for is not FSDP run on a CPU
    _check_disk_space(run, recipe, trainable)
    return trainable, total


def _fit(recipe: Recipe, run: RunDir, trainer: Any, checkpoint: Path | None, speed: Speed, stop: Any) -> Any:
    """`trainer.train`, from `checkpoint` when resuming, stopping cleanly on SIGTERM/SIGINT; each way it can end
    early (out of memory, a reward function's failure, a full disk, a signal) becomes a message saying what next."""
    import torch

    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        raise RuntimeError(_oom_advice(recipe, speed)) from e
    except RewardFailed as e:
        command = _command(recipe) or "finetune train RECIPE"
        saved = f"checkpoint saved at step {e.checkpoint_step}" if e.checkpoint_step else "no step completed"
        raise TrainingInterrupted(f"{e}; {saved}; fix the function, then: {redact_text(command)} --resume") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise WriteError(
                f"could not write {e.filename or run.root}: disk full; the last complete checkpoint is kept"
            ) from e
        raise
    finally:
        stop.uninstall()
    if stop.received is not None:
        command = _command(recipe) or "finetune train RECIPE"  # RECIPE only for a recipe built in code
        raise TrainingInterrupted(
            f"stopped by signal {stop.received} at step {trainer.state.global_step}; checkpoint saved; "
            f"continue with: {redact_text(command)} --resume"
        )
    return output


def _keep_best_adapter(recipe: Recipe, run: RunDir, manifest: Manifest, trainer: Any, tokenizer: Any) -> None:
    """adapter/ and the model in memory hold the best held-out adapter (the last one without held-out data);
    the tokenizer and template saved beside it are hashed into the manifest."""
    state = process_state()
    if state.is_main_process and not run.adapter.exists():  # no held-out data: the final adapter is the one
        _save_adapter(recipe, run, trainer.model, tokenizer)
    state.wait_for_everyone()
    if manifest.data.get("best_step") not in (None, trainer.state.global_step):
        _load_adapter_weights(trainer.model, lora_init.reload_from(recipe, run.root, run.adapter))
    manifest.update(tokenizer_sha256=file_sha256(run.adapter / "tokenizer.json"),
                    chat_template_sha256=file_sha256(run.adapter / "chat_template.jinja"))  # fmt: skip


def _decide_speed(
    recipe: Recipe,
    machine: Machine,
    attention: str,
    liger: bool,
    model_config: Any,
    seq_length: int,
    recorded: dict[str, Any] | None = None,
) -> Speed:
    """Every `auto` speed setting, decided once: checkpointing from the peak memory estimated for the model
    and the sequence length this run has already loaded and prepared (no second pass over the data).
    `recorded`: a resumed run's decisions, from its manifest."""
    setting = recipe.train.gradient_checkpointing
    packable = methods.load(recipe.train.method).PACKABLE  # SFT's rows; the other trainers batch their own
    packing = packable and decide_packing(recipe.data.packing, (recorded or {}).get("packing"))
    peak = None
    if needs_peak(setting, machine):
        from finetune.plan import peak_memory

        try:
            peak = peak_memory(recipe, model_config, seq_length, attention, machine)
        except Exception as e:  # an estimate must never fail a run: unknown means checkpointing on
            warnings.warn(f"no memory estimate ({type(e).__name__}: {e}); gradient checkpointing on", stacklevel=2)
    return Speed(
        attn_implementation=attention,
        padding_free=packable and (decide_padding_free(recipe.data.padding_free, attention) or packing),
        packing=packing,
        gradient_checkpointing=decide_checkpointing(setting, machine, peak),
        liger_kernel=liger,
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


def _save_adapter(recipe: Recipe, run: RunDir, model: Any, tokenizer: Any) -> None:
    with atomic_dir(run.adapter) as tmp:
        lora_init.save_adapter(recipe, run.root, model, tmp)  # a plain LoRA on the original base, whatever the init
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
    half = f"--set train.batch_size={t.batch_size // 2} --set train.grad_accum={t.grad_accum * 2} (same global batch); "
    plan = redact_text(recipe.source.command(stage="plan")) if recipe.source else "finetune plan RECIPE"
    return (
        f"out of memory at batch_size {t.batch_size}, max_seq_length {d.max_seq_length}, "
        f"gradient_checkpointing {str(speed.gradient_checkpointing).lower()}, "
        f"quantization {recipe.quantization.method}. "
        f"Try, in order: {half if t.batch_size > 1 else ''}"
        "--set train.gradient_checkpointing=true; a lower data.max_seq_length; --set quantization.method=nf4; "
        f"and see `{plan}` for the memory estimate per component."
    )


def training_arguments(recipe: Recipe, run: RunDir, speed: Speed, machine: Machine) -> dict[str, Any]:
    """The arguments every TRL trainer config shares (optimisation, checkpoints, logging), from the recipe."""
    import torch

    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype, machine)
    on_gpu = machine.cuda
    return dict(
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
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
