"""User-facing errors.

The CLI maps `UserError` to exit code 2 and prints it without a traceback; every other
exception is a runtime failure (exit 1). Library code raises, it never exits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One mistake, located: `recipe.yaml:14:3 lora.rank: must be >= 1 (got -4)`."""

    message: str
    where: str = ""  # "file:line:col", "file:row" or "--set"
    key: str = ""  # dotted recipe path, e.g. "lora.rank"

    def __str__(self) -> str:
        head = " ".join(part for part in (self.where, self.key) if part)
        return f"{head}: {self.message}" if head else self.message


class UserError(Exception):
    """Bad input from the user (recipe, data, arguments): exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, problems: str | Problem | list[Problem]):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RecipeError(UserError):
    """The recipe (its files, `extends` chain or `--set` overrides) is invalid."""


class DataError(UserError):
    """A dataset row or source is invalid; the message names the file and row."""


class RunDirError(UserError):
    """The run directory exists and would be overwritten, or cannot be used."""


class WriteError(Exception):
    """The disk is full, over quota or read-only: names what could not be written and what was kept (exit 1)."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after a checkpoint: exit code 3, resumable with --resume."""

    exit_code = 3


class LaunchError(Exception):
    """The processes that `train.distributed` launched failed; they reported why themselves, on stderr."""

    def __init__(self, exit_code: int):
        super().__init__(f"the launched training processes exited with {exit_code}; their errors are above")
        self.exit_code = exit_code or 1


class TrainingStopped(Exception):
    """A caller's `on_eval` hook stopped training early (a sweep pruning a hopeless trial): the run is
    marked `stopped`, not failed, and the caller decides what it means."""


class RewardFailed(Exception):
    """A reward function raised or returned something other than a finite number during training.

    The trainer saves a checkpoint of the last completed step first (`checkpoint_step`, None when no
    step was completed); `finetune train` then stops with exit code 3, resumable once the function is fixed.
    """

    def __init__(self, message: str, checkpoint_step: int | None = None):
        super().__init__(message)
        self.checkpoint_step = checkpoint_step
