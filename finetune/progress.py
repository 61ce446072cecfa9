"""Training progress for a person: a live bar in a terminal, one line per log step elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

from finetune.units import duration

REDRAW_S = 0.5  # the bar is redrawn from the training loop at most this often


class TrainProgress(TrainerCallback):
    """Step, loss, tokens/s and ETA, on stderr so that --json output on stdout stays clean."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None
        self.start = 0.0
        self.tokens = (0.0, 0.0)  # (time, cumulative tokens) at the last log
        self.rate = 0.0
        self.first_step: int | None = None  # the step this process started from (a resumed run's checkpoint)
        self.drawn = 0.0  # when the bar was last drawn

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.tokens = (self.start, 0.0)
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
                auto_refresh=False,
            )  # fmt: skip  (no refresh thread taking the GIL from the training loop 10 times a second)
            self.task = self.bar.add_task("train", total=state.max_steps, info="")
            self.bar.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None:  # on_train_begin comes before a resumed run's state is loaded
            self.first_step = state.global_step - 1
            if self.bar is not None:  # the bar's speed must not count the resumed steps as done just now
                self.bar.reset(self.task, total=state.max_steps, completed=self.first_step, info="")
        if self.bar is not None:
            now = time.perf_counter()
            redraw = now - self.drawn > REDRAW_S
            self.bar.update(self.task, completed=state.global_step, refresh=redraw)
            if redraw:
                self.drawn = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
        if tokens > self.tokens[1]:
            self.rate = (tokens - self.tokens[1]) / max(now - self.tokens[0], 1e-9)
            self.tokens = (now, tokens)
        parts = [
            f"loss {logs['loss']:.4f}" if "loss" in logs else "",
            f"eval_loss {logs['eval_loss']:.4f}" if "eval_loss" in logs else "",
            f"acc {logs['rewards/accuracies']:.2f}" if "rewards/accuracies" in logs else "",  # preference methods
            f"margin {logs['rewards/margins']:.3f}" if "rewards/margins" in logs else "",
            f"reward {logs['reward']:.3f}" if "reward" in logs else "",  # GRPO: the mean of this step's groups
            f"kl {logs['kl']:.4f}" if "kl" in logs else "",
        ]
        parts.append(f"{self.rate:,.0f} tok/s" if self.rate else "")
        info = "  ".join(p for p in parts if p)
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, info=info, refresh=True)
            return
        elapsed = now - self.start
        done = state.global_step - (self.first_step or 0)  # steps this process did: the rate after a resume
        eta = elapsed / max(done, 1) * (state.max_steps - state.global_step)
        print(
            f"step {state.global_step}/{state.max_steps}  {info}  elapsed {duration(elapsed)}  eta {duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.refresh()
            self.bar.stop()
