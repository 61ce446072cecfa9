"""The fast defaults: recipe settings left at `auto`, decided for the machine the run is on.

Each decision is a pure function of the recipe's setting, the machine's facts (`finetune.machine`)
and the figures it is given, so that a test can decide for any machine; `finetune train` makes
each one once and records it in the run's manifest. A recipe that names a value gets exactly
that value. Measured effects: docs/measurements/speed.md and `scripts/bench.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from finetune.errors import UserError
from finetune.machine import Machine, resolve_dtype
from finetune.recipe.schema import GPU_MEMORY_SHARE, Recipe


@dataclass(frozen=True)
class Speed:
    attn_implementation: str
    padding_free: bool
    packing: bool
    gradient_checkpointing: bool
    liger_kernel: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_attention(setting: str, dtype: torch.dtype, machine: Machine) -> str:
    """FlashAttention 2 where it runs (CUDA, half precision, package installed): packed rows need no mask."""
    if setting != "auto":
        return setting
    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if machine.cuda and half and machine.flash_attn else "sdpa"


def model_attention(recipe: Recipe, machine: Machine) -> str:
    """`decide_attention` for the recipe's model settings: what every stage that loads the model passes to it."""
    return decide_attention(recipe.model.attn_implementation, resolve_dtype(recipe.model.dtype, machine), machine)


def decide_padding_free(setting: bool | str, attention: str) -> bool:
    """Padding-free batches where the attention kernel takes flattened rows as they are (flash attention's varlen).

    The batch keeps its rows and its loss (tests/test_packing.py); only the pad tokens go. With SDPA or
    eager attention the flattened batch becomes one long sequence under a block mask: attention then
    costs (batch x length)^2 instead of batch x length^2 (measured on the CPU with packing: 0.68x the
    tokens/s of padded rows).
    """
    return attention.startswith("flash") if setting == "auto" else bool(setting)


def decide_packing(setting: bool | str, recorded: bool | None) -> bool:
    """Only when asked: packing changes the batches (more rows a step, fewer steps), which cost held-out quality.

    `auto` is an older recipe's or run directory's (it packed with flash attention until issue #19): off,
    except for a run being resumed that packed (`recorded`, its manifest's decision), which keeps its batches.
    """
    return bool(recorded) if setting == "auto" else bool(setting)


def decide_checkpointing(setting: bool | str, machine: Machine, peak_bytes: int | None) -> bool:
    """Off unless the run would not fit without it: recomputing activations cost 22-27% of the tokens/s here.

    On the CPU memory is the host's and the models are small: off. On a GPU, the estimated peak
    without checkpointing (`finetune.plan.peak_memory`) decides; when it is unknown, on (the safe choice).
    """
    if setting != "auto":
        return bool(setting)
    if machine.gpu_bytes is None:
        return False
    return peak_bytes is None or peak_bytes > GPU_MEMORY_SHARE * machine.gpu_bytes


def needs_peak(setting: bool | str, machine: Machine) -> bool:
    """Whether `decide_checkpointing` will read the peak estimate: spare the estimate where it would not."""
    return setting == "auto" and machine.gpu_bytes is not None


def decide_liger(setting: bool | str, machine: Machine) -> bool:
    """Liger's Triton kernels when they can run: a CUDA GPU and the liger-kernel package."""
    available = machine.cuda and machine.liger_kernel
    if setting is True and not available:
        raise UserError(
            "train.liger_kernel: true needs a CUDA GPU and the liger-kernel package (pip install 'finetune[fast]'); "
            "set it to auto to use Liger only where it can run"
        )
    return available if setting == "auto" else bool(setting)
