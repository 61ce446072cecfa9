"""Facts about the machine a process runs on: its GPU, its dtypes, its place in a distributed run.

A leaf: it imports nothing of ours, so that every layer may ask it. The facts are plain
figures (`Machine`), read once by a stage and passed on, so that a decision made from them is
a pure function a test can feed any machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Machine:
    """What the `auto` settings depend on."""

    cuda: bool  # a CUDA GPU is there
    bf16: bool  # it computes in bfloat16 (Ampere and newer)
    gpu_bytes: int | None  # memory of the GPU this process trains on; None without one
    flash_attn: bool  # the flash-attn package is installed
    liger_kernel: bool  # the liger-kernel package is installed


# The GPU `finetune plan` plans for: one that will be rented, not this machine.
PLANNED_GPU = Machine(cuda=True, bf16=True, gpu_bytes=None, flash_attn=False, liger_kernel=False)


def this_machine() -> Machine:
    """The facts of the machine this process runs on."""
    cuda = torch.cuda.is_available()
    return Machine(
        cuda=cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gpu_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None,
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
    )


def resolve_dtype(name: str, machine: Machine | None = None) -> torch.dtype:
    """The one meaning of `dtype: auto`, everywhere: bfloat16 on a GPU that computes in it, float16 on an older
    GPU, float32 on the CPU, for the machine that runs the model (this one unless given: `plan` gives its GPU).
    """
    if name != "auto":
        return getattr(torch, name)
    machine = machine or this_machine()
    if not machine.cuda:
        return torch.float32
    return torch.bfloat16 if machine.bf16 else torch.float16


def device() -> torch.device:
    """The device this process trains on: its local CUDA GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_memory() -> None:
    """Give the memory of models just deleted back to the GPU, before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def process_state() -> Any:
    """accelerate's process state (rank, world size, barriers); on the CPU it must be asked for gloo explicitly."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
