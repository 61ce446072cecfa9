"""What every method's TRL trainer shares, made safe to lose: atomic checkpoints, a stop on the first non-finite
loss or gradient, a clean stop on SIGTERM/SIGINT, the best held-out adapter kept, every log in metrics.jsonl.

Each method (`finetune.methods`) mixes `SafeTraining` into its TRL trainer class; `finetune.train`
adds the callbacks. Everything is done through the Trainer's extension points (a mixin and
callbacks); TRL and transformers are not patched.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from finetune.files import clean_stale, no_room_names
from finetune.runs import discard
from finetune.summary import EvalPoint

STAGING = ".staging"


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf: training stops at the next log or checkpoint, whichever comes
    first (the check costs no host sync per step), and nothing trained past it is saved."""


class SafeTraining:
    """Mixed in before a TRL trainer class: checkpoints appear only when complete, no training through NaN.

    Shared by every training method (SFT, DPO, KTO, GRPO), so that atomic checkpoints, the NaN stop and
    seeded length grouping are written once.
    """

    _saving = False
    _nonfinite: torch.Tensor | None = None  # see _watch

    def __init__(self, *args: Any, group_by_length: bool = False, loraplus_lr_ratio: float | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self.group_by_length = group_by_length
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(*args, **kwargs)
        _output_rows_readable(self.model)

    def create_optimizer(self, model=None):
        """`train.loraplus_lr_ratio`: PEFT's LoRA+ parameter groups (B matrices at lr x ratio) in the optimizer the
        recipe chose, with its own arguments. Resuming restores its state like any optimizer's: the groups are
        built in the same order from the same model."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(opt_model, cls, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)  # fmt: skip
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._watch(0, loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None:
            self._watch(1, grad_norm)
        return grad_norm

    def _watch(self, which: int, value: Any) -> None:
        """Note the first step whose loss (0) or gradient norm (1) is not finite, on the device: no host sync.

        Reading the value every step would stall a GPU's queue twice a step (transformers itself syncs
        only when it logs); it is read where it matters: before each log and each checkpoint.
        """
        value = torch.as_tensor(value).detach()
        if self._nonfinite is None:
            self._nonfinite = torch.zeros(2, 2, dtype=torch.float64, device=value.device)  # [step, value] per kind
        value = value.to(self._nonfinite.device, torch.float64).sum()  # a NaN or inf anywhere stays one
        first = ~torch.isfinite(value) & (self._nonfinite[which, 0] == 0)
        found = torch.stack([torch.full_like(value, self.state.global_step + 1), value])  # kernels, no copies
        self._nonfinite[which] = torch.where(first, found, self._nonfinite[which])

    def _stop_if_nonfinite(self) -> None:
        if self._nonfinite is None:
            return
        found = [(step, name, value) for name, (step, value) in zip(("loss", "gradient norm"),
                                                                     self._nonfinite.tolist(), strict=True) if step]  # fmt: skip
        if found:
            step, name, value = min(found)
            raise NonFiniteError(f"{name} is {value} at step {int(step)}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._stop_if_nonfinite()
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches in an order fixed by the seed and the epoch (transformers' own sampler draws
        from the global RNG, so a resumed run would see other batches than the killed one)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return GroupedByLength(token_counts(dataset), batch, self.args.seed, lambda: int(self.state.epoch or 0))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No card in checkpoints/: the adapter carries PEFT's, and `finetune export` writes the real one."""

    def _get_output_dir(self, trial):
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if self._saving else root

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint under checkpoints/.staging/, fsync it, then rename it into place."""
        self._stop_if_nonfinite()  # nothing trained through a NaN is ever saved
        final_root = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._saving = True
        try:
            kept = "the last complete checkpoint is kept; free space, then --resume"
            with no_room_names(final_root / name, kept, staging=final_root / STAGING / name):
                super()._save_checkpoint(model, trial)
        except BaseException:
            import shutil

            shutil.rmtree(final_root / STAGING / name, ignore_errors=True)  # a partial checkpoint frees its space
            raise
        finally:
            self._saving = False
        self.accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
        if not self.args.should_save:
            return
        staged = final_root / STAGING / name
        _fsync_tree(staged)
        target = final_root / name
        if target.exists():  # the same step saved again (e.g. on stop): keep the newest
            discard(target)
        os.replace(staged, target)
        _fsync_dir(final_root)
        rotate(final_root, self.args.save_total_limit)


def rotate(checkpoints: Path, limit: int | None) -> None:
    """Keep the newest `limit` checkpoints, as transformers' rotation does, but delete each old one by renaming
    it aside first (`runs.discard`): a kill mid-rotation never leaves a checkpoint-N/ without its weights.
    Remains of an earlier killed rotation or save are cleaned here too."""
    clean_stale(checkpoints)
    if not limit or limit <= 0:
        return
    ordered = sort_checkpoints(str(checkpoints))
    for old in ordered[: max(len(ordered) - limit, 0)]:
        discard(Path(old))


class GroupedByLength(torch.utils.data.Sampler):
    """Shuffled, then sorted by length within groups of 50 batches: little padding, still a random order.

    The order depends on the seed and the epoch only. The epoch is read from the trainer's state:
    `set_epoch` does not reach a sampler under accelerate's batch-sharding and batch-skipping
    wrappers (several processes, a resumed epoch), which would replay epoch 0's order.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epoch: Callable[[], int]) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch())
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def token_counts(dataset: Any) -> list[int]:
    """Tokens per row, read from the Arrow column without building Python lists of ids."""
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is None and hasattr(dataset, "data"):
        return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    return [len(ids) for ids in dataset["input_ids"]]


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsJsonl(TrainerCallback):
    """Appends every log (train and eval) to metrics.jsonl with tokens/s between logs; NaNs are kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = (time.perf_counter(), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        t, tokens = time.perf_counter(), float(logs.get("num_tokens", self.last[1]))
        if tokens > self.last[1]:
            logs["tokens_per_s"] = (tokens - self.last[1]) / max(t - self.last[0], 1e-9)
            self.last = (t, tokens)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")


class BestAdapter(TrainerCallback):
    """After each held-out evaluation, keep the adapter with the best `metric` (via `save`): the lowest held-out
    loss by default, the highest held-out reward for GRPO. `best` is the value to beat (a resumed run's)."""

    def __init__(self, save: Callable[[int, float], None], best: float | None = None, metric: str = "eval_loss",
                 higher: bool = False) -> None:  # fmt: skip
        self.save, self.metric, self.higher = save, metric, higher
        self.best = best if best is not None else (-math.inf if higher else math.inf)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is not None and (value > self.best if self.higher else value < self.best):
            self.best = value
            self.save(state.global_step, value)


class ReportEval(TrainerCallback):
    """Hands each held-out evaluation to a caller's hook (`train(on_eval=...)`), which may raise to stop the run:
    the figure the method ranks adapters by (`BestAdapter`'s), not always the loss (GRPO's is its reward)."""

    def __init__(self, hook: Callable[[EvalPoint], None], metric: str = "eval_loss", higher: bool = False) -> None:
        self.hook, self.metric, self.higher = hook, metric, higher

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is not None:
            self.hook(EvalPoint(state.global_step, self.metric.removeprefix("eval_"), float(value), self.higher))


class EvaluateAtEnd(TrainerCallback):
    """Held-out loss at the last step too, inside training (so trackers log it in the same run)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: checkpoint at the end of the current step and stop; a second signal stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_process_received(args.device):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_process_received(self, device: torch.device) -> bool:
        """Processes must stop at the same step, or the others would wait forever in a collective."""
        import torch.distributed as dist

        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([int(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
            self.received = self.received or (signal.SIGTERM if flag else None)
        return flag


def _output_rows_readable(model: Any) -> None:
    """New tokens' output rows (PEFT's trainable_token_indices on the output layer, or tied to the embeddings'):
    TRL's fused LM head reads `lm_head.weight` and `lm_head.bias`; PEFT's wrapper answers `weight` with the trained
    rows in place (so they learn) but has no `bias`. Give this one instance the bias of the layer it wraps (None for
    every head we know), set past nn.Module's registration so that no parameter is added to the adapter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapter = getattr(head, "token_adapter", None) if head is not None else None
    if adapter is not None and "bias" not in head.__dict__:
        object.__setattr__(head, "bias", adapter.get_base_layer().bias)


def build(cls: type, model: Any, tokenizer: Any, data: Any, args: Any, peft_config: Any, callbacks: list,
          loraplus_lr_ratio: float | None = None, **own: Any) -> Any:  # fmt: skip
    """A method's trainer class on its prepared data (`data.train`, `data.eval`): the arguments every TRL trainer
    takes, the LoRA+ ratio every method honours, then the method's `own` (GRPO's reward functions, SFT's length
    grouping)."""
    return cls(
        loraplus_lr_ratio=loraplus_lr_ratio,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        **own,
    )
