"""A recipe's reward functions as TRL's GRPOTrainer calls them, checked value by value.

A reward is written like an eval metric, `fn(prediction, reference) -> float` for one completion,
so the function a CI gate checks with `finetune eval` is the one GRPO maximised. TRL calls reward
functions on a whole batch with the dataset's columns as keyword arguments; `Reward` adapts the
one to the other and stops on the first value that is not a finite number, naming the function,
the data row and the value, instead of letting a NaN advantage poison the update.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from finetune.errors import RewardFailed, UserError
from finetune.recipe import callables
from finetune.scoring import GENERATION_FUNCTIONS


class Reward:
    """One reward, callable as TRL's `reward_func(prompts, completions, reference=..., where=..., **columns)`."""

    def __init__(self, spec: str) -> None:
        self.__name__ = callables.short_name(spec)  # TRL logs rewards/<name>/mean and /std under this name
        self.fn = load_reward(spec)

    def __call__(self, prompts: list[Any], completions: list[Any], reference: list[str], where: list[str],
                 **columns: Any) -> list[float]:  # fmt: skip
        return [self.score(_text(c), ref, w) for c, ref, w in zip(completions, reference, where, strict=True)]

    def score(self, prediction: str, reference: str, where: str = "") -> float:
        """The reward of one completion; anything but a finite number raises RewardFailed naming the row."""
        row = f" on {where}" if where else ""
        try:
            value = self.fn(prediction, reference)
        except Exception as e:
            raise RewardFailed(
                f"reward {self.__name__} raised {type(e).__name__}: {e}{row} (completion {prediction[:200]!r})"
            ) from e
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # bools and numpy numbers count
            raise RewardFailed(
                f"reward {self.__name__} returned {value!r}{row}, not a finite number (completion {prediction[:200]!r})"
            )
        return float(value)


def load_reward(spec: str) -> Callable[[str, str], Any]:
    """A built-in generation metric or the user's `module:function(prediction, reference)`."""
    if spec in GENERATION_FUNCTIONS:
        return GENERATION_FUNCTIONS[spec]
    try:
        return callables.load(spec, ("prediction", "reference"))
    except callables.CallableError as e:  # validate and the start of train check it: only if it changed since
        raise UserError(f"train.grpo.rewards: {callables.short_name(spec)}: {e}") from None


def _text(completion: Any) -> str:
    """A completion as text: TRL passes strings for text prompts, message lists for conversations."""
    return completion if isinstance(completion, str) else completion[-1]["content"]
