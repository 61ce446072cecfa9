"""The fast defaults: recipe settings left at `auto`, decided for the machine the run is on.

Each decision is the fast choice where it is correct here, and each is recorded in the run's
manifest; a recipe that names a value gets exactly that value. Measured effects: README
("Speed") and `scripts/bench.py`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

from finetune.errors import UserError
from finetune.recipe import Recipe

GPU_MEMORY_SHARE = 0.9  # gradient checkpointing stays off while the plan's peak is below this share of the GPU


@dataclass(frozen=True)
class Speed:
    attn_implementation: str
    packing: bool
    gradient_checkpointing: bool
    liger_kernel: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(recipe: Recipe) -> Speed:
    """Every `auto` speed setting of the recipe, resolved for this machine."""
    import torch

    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return Speed(
        attn_implementation=attention(recipe),
        packing=packing(recipe),
        gradient_checkpointing=checkpointing(recipe, gpu_bytes),
        liger_kernel=liger(recipe),
    )


def attention(recipe: Recipe) -> str:
    """FlashAttention 2 where it runs (CUDA, half precision, package installed): packed rows need no mask."""
    setting = recipe.model.attn_implementation
    if setting != "auto":
        return setting
    import torch

    from finetune.modeling import resolve_dtype

    half = resolve_dtype(recipe.model.dtype) in (torch.bfloat16, torch.float16)
    flash = torch.cuda.is_available() and half and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def packing(recipe: Recipe) -> bool:
    """Padding-free packing where the attention kernel takes packed rows as they are (flash attention's varlen).

    With SDPA or eager attention the packed batch becomes one long sequence under a block mask:
    attention then costs (batch x length)^2 instead of batch x length^2. Measured on the CPU (README,
    Speed): packing ran at 0.68x the tokens/s of unpacked rows; `data.group_by_length` cuts padding there.
    """
    setting = recipe.data.packing
    return attention(recipe).startswith("flash") if setting == "auto" else setting


def checkpointing(recipe: Recipe, gpu_bytes: int | None) -> bool:
    """Off unless the run would not fit without it: recomputing activations cost 22-27% of the tokens/s here.

    On the CPU memory is the host's and the models are small: off. On a GPU, `finetune plan`'s
    estimate decides (config only, no weights read); when it cannot tell, on (the safe choice).
    """
    setting = recipe.train.gradient_checkpointing
    if setting != "auto":
        return setting
    if gpu_bytes is None:
        return False
    from finetune.plan import plan

    try:
        total = plan(recipe).memory.total  # under `auto`, the total without checkpointing
    except Exception:  # an estimate must never fail a run
        return True
    return total is None or total > GPU_MEMORY_SHARE * gpu_bytes


def liger(recipe: Recipe) -> bool:
    """Liger's Triton kernels when they can run: a CUDA GPU and the liger-kernel package."""
    import torch

    setting = recipe.train.liger_kernel
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if setting is True and not available:
        raise UserError(
            "train.liger_kernel: true needs a CUDA GPU and the liger-kernel package (pip install 'finetune[fast]'); "
            "set it to auto to use Liger only where it can run"
        )
    return available if setting == "auto" else setting
