"""What a distributed launch asked for against what accelerate actually runs.

accelerate turns a config's `distributed_type: FSDP` into FSDP only on an accelerator (CUDA, XPU, NPU, ...):
on a CPU-only machine (accelerate 1.15) the same `configs/accelerate/fsdp.yaml` launches plain data
parallel over gloo, silently. The run still trains correctly, but nothing is sharded, so the manifest
records both and the run warns: a CPU rehearsal of a sharded recipe must not read as a sharded run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}  # set by `accelerate launch`


def record(accelerator: Any) -> dict[str, str | None]:
    """The manifest's `distributed`: {"requested": FSDP | DEEPSPEED | None, "ran": accelerate's distributed type};
    warns when the two differ."""
    requested = next((kind for env, kind in REQUESTS.items() if os.environ.get(env, "").lower() == "true"), None)
    ran = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if requested is not None and ran != requested:
        warnings.warn(
            f"the launch asked for {requested}, but accelerate runs {ran} here ({requested} needs a GPU or other "
            "accelerator): the model is not sharded, every process holds all of it",
            stacklevel=2,
        )
    return {"requested": requested, "ran": ran}
