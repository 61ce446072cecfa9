"""`finetune serve --engine vllm` with the real vLLM (CPU build here): eval's answers, our names, a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_runs import examples, meaningful

from finetune.errors import UserError

pytestmark = pytest.mark.engines
STARTUP_S = 1800  # vLLM's CPU build: ~1-2 min on 2 idle cores, over 10 min on a loaded machine


@pytest.fixture(scope="session")  # session, as quickstart_run: pytest sets up wider scopes first
def vllm_python() -> str:
    from finetune.inference.vllm import find_python

    try:
        return find_python()
    except UserError as e:
        pytest.skip(f"vLLM not installed ({e}); run bash scripts/setup_engines.sh")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(vllm_python, quickstart_run, tmp_path_factory):  # vLLM first: skip before training
    """finetune serve RUN --engine vllm on a free loopback port, with an API key; stopped by SIGTERM."""
    port, key = _port(), "engine-test-key"
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "FINETUNE_VLLM_PYTHON": vllm_python, "FINETUNE_API_KEY": key}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", str(quickstart_run), "--engine", "vllm",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"finetune serve --engine vllm exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"vLLM did not answer within {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
    yield proc, client, log
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (finetune passes it on to vLLM and waits), then SIGKILL to it and every process below it:
    a bare kill of finetune would leave vLLM running, re-parented."""
    if proc.poll() is not None:
        return
    below = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in below:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_vllm_answers_as_eval_predicted_under_our_names(server, quickstart_run):
    _, client, _ = server
    from finetune.inference.serve import base_name
    from finetune.runs import open_run

    run = open_run(quickstart_run)
    base, name = base_name(run), run.recipe.name
    assert {m.id for m in client.models.list().data} == {base, name}  # the names our own engine serves
    rows = examples(quickstart_run)
    meaningful(rows)
    max_tokens = run.recipe.eval.max_new_tokens
    for row in rows:
        for model, expected in ((name, row["tuned"]), (base, row["base"])):
            chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["user"]}],
                                                  max_tokens=max_tokens, temperature=0)  # fmt: skip
            assert chat.choices[0].message.content == expected, (model, row["user"])
        text = client.completions.create(model=name, prompt=row["prompt"], max_tokens=max_tokens, temperature=0)
        assert text.choices[0].text == row["tuned"], row["prompt"]


def test_a_wrong_key_is_refused(server):
    _, client, _ = server
    import openai

    wrong = client.with_options(api_key="not-the-key")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_sigterm_stops_vllm_with_finetune(server):
    proc, _, log = server
    below = _descendants(proc.pid)
    assert below, "finetune serve --engine vllm started no child process"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in below if _alive(p)], "vLLM processes outlived finetune serve"
