"""`finetune serve`: an OpenAI-compatible API over one base model and many runs' adapters (FastAPI + uvicorn).

The base is loaded once (as the first run trained on it: 4-bit for a QLoRA run); every run's
adapter is a named PEFT adapter, selected by the request's `model` (the run name; the base
answers under its own name with the adapters disabled). Each adapter answers with its run's own
tokenizer and chat template, through `finetune.generation` (the decoding `eval` uses).

Which adapter answers: generation is serialised behind one lock, and the adapter is switched
(`set_adapter`, or `disable_adapter` for the base) inside it, so an answer can never come from
another request's adapter. PEFT's mixed-batch `adapter_names` would batch requests for different
adapters together, but needs a batcher in front; `scripts/bench_serve.py` measures what the lock
costs (1 vs 4 resident adapters under mixed requests) and docs/measurements/serving.md gives the figures.
It is long (~780 lines) because the request models, the guard (API key, body size, queue) and the
handlers are one contract behind one lock (`--engine vllm` only builds and runs vLLM's own command).

Safe by default: localhost; an API key (`--api-key` or FINETUNE_API_KEY) is required for every
request when set and to bind any other address; max_tokens, prompt tokens, request body and the
queue are capped with a 4xx naming the limit; errors are OpenAI-shaped bodies without tracebacks;
a client that disconnects stops its generation at the next token; SIGTERM drains (uvicorn).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shlex
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from finetune.data.templates import encode
from finetune.errors import UserError
from finetune.generation import Sampling, chat_prompt, stream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.inference.loaded import Loaded
    from finetune.runs import Run

log = logging.getLogger("finetune.inference.serve")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "FINETUNE_API_KEY"
ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is named in the 400/413/503 that enforces it."""

    max_tokens: int = 1024  # default and maximum of max_tokens
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_body_bytes: int = 1 << 20
    max_queue: int = 32  # requests waiting for the model beyond the one generating
    max_lora_rank: int | None = None  # None: any rank PEFT can hold


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the models: one base, named adapters ----------------------------------------------------------


@dataclass
class Served:
    """One name the API answers to: an adapter (with its run) or the base (run None)."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    run: Run | None
    created: int = field(default_factory=lambda: int(time.time()))


class Models:
    """The base model with its named adapters; every generation holds the lock with its adapter selected."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.model, self.limits = loaded.model, limits
        self.first = loaded.run
        self.base_name = base_name(loaded.run)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()  # held by the one generating request
        self.counter = threading.Lock()
        self.waiting = 0  # requests blocked on `lock`
        self.served: dict[str, Served] = {self.base_name: Served(self.base_name, loaded.tokenizer, None)}
        self._check_name(loaded.name)
        self._check_holdable(loaded.run)
        self.served[loaded.name] = Served(loaded.name, loaded.tokenizer, loaded.run)

    def names(self) -> list[str]:
        return list(self.served)

    def get(self, name: str) -> Served:
        if name not in self.served:
            raise ApiError(404, f"model {name!r} does not exist; served here: {', '.join(self.served)}", "model",
                           "model_not_found")  # fmt: skip
        return self.served[name]

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Load a run's adapter beside the others; refuse one trained on another base or that cannot be held."""
        from finetune.inference.loaded import chat_tokenizer
        from finetune.runs import open_run

        try:
            run = open_run(path)
        except UserError as e:
            raise ApiError(400, f"cannot load adapter from {path}: {e}", "lora_path") from None
        name = name or run.recipe.name
        self._check_name(name)
        refused = same_base(self.first, run)
        if refused:
            raise ApiError(400, f"adapter {name!r} ({run.root}) was trained on another base: {refused}", "lora_path")
        self._check_holdable(run)
        tokenizer = chat_tokenizer(run.adapter)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:  # the base was grown for the first run's tokens only, or not at all
            raise ApiError(400, f"adapter {name!r} ({run.root}) added tokens: its tokenizer has {len(tokenizer)} "
                                f"tokens, this base's embeddings {rows} rows; serve it first or on its own",
                           "lora_path")  # fmt: skip
        with self.lock:
            self._check_name(name)  # again: another load may have taken the name meanwhile
            try:
                self.model.load_adapter(str(run.adapter), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as e:
                self._forget(name)  # a load that failed half-way must leave the model as it was
                raise ApiError(400, f"adapter {name!r} cannot be held by this base: {e}", "lora_path") from None
        self.served[name] = Served(name, tokenizer, run)
        return name

    def _check_name(self, name: str) -> None:
        """A name the API can answer to and PEFT can hold: free, and not one PEFT would mistake for its own."""
        if name in self.served:
            what = "the base model's name" if name == self.base_name else "already loaded; unload it first"
            raise ApiError(400, f"an adapter named {name!r}: {what}", "lora_name")
        refused = adapter_name_problem(name)
        if refused:
            raise ApiError(400, f"lora_name {name!r}: {refused}", "lora_name", "invalid_value")

    def _forget(self, name: str) -> None:
        """Remove whatever a failed load_adapter left of `name` (its config, its layers), keeping the active one."""
        if name not in self.model.peft_config:
            return
        try:
            self.model.delete_adapter(name)
        except (ValueError, KeyError, AttributeError):
            del self.model.peft_config[name]

    def remove(self, name: str) -> None:
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model, not an adapter", "lora_name")
        if name not in self.served:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found")
        with self.lock:
            del self.served[name]
            self.model.delete_adapter(name)

    def _check_holdable(self, run: Run) -> None:
        from finetune.runtimes import adapter_facts

        rank = adapter_facts(run)["max_rank"]
        if self.limits.max_lora_rank is not None and rank > self.limits.max_lora_rank:
            raise ApiError(400, f"adapter {run.recipe.name!r} has rank {rank}, above this server's --max-lora-rank "
                                f"{self.limits.max_lora_rank}", "lora_path")  # fmt: skip

    def admit(self) -> None:
        """Refuse a request when the queue in front of the model is full (checked before anything starts)."""
        if self.waiting >= self.limits.max_queue:
            raise ApiError(503, f"server busy: {self.waiting} requests are waiting for the model (finetune serve "
                                f"--max-queue {self.limits.max_queue})", code="queue_full")  # fmt: skip

    @contextmanager
    def using(self, name: str) -> Iterator[tuple[Served, Any]]:
        """Hold the model with `name`'s adapter active (or all adapters disabled for the base): (served, the model
        to generate with; the plain base model once every adapter is unloaded, as PEFT keeps no active one then)."""
        with self.counter:
            self.waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self.counter:
                self.waiting -= 1
        try:
            served = self.served.get(name)
            if served is None:  # unloaded while this request waited
                raise ApiError(404, f"model {name!r} was unloaded", "model", "model_not_found")
            if served.run is None and not self.model.peft_config:
                yield served, self.model.base_model.model  # the transformers model, its LoRA layers empty
            elif served.run is None:
                with self.model.disable_adapter():
                    yield served, self.model
            else:
                self.model.set_adapter(name)
                yield served, self.model
        finally:
            self.lock.release()


def adapter_name_problem(name: str) -> str | None:
    """Why PEFT cannot safely hold an adapter named `name`, or None. PEFT names each adapter's weights
    `<prefix><name>` (LoRA: `lora_A.<name>`) and warns that a name inside its prefix "may reinitialize the
    adapter weights"; torch refuses a module name with a dot."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType.LORA, "lora_")
    if name in prefix:
        return (f"a name that is part of PEFT's weight prefix {prefix!r} (such as 'lora', 'ora' or 'a') would make "
                "PEFT reinitialize the adapter weights on loading; choose another name")  # fmt: skip
    if "." in name:
        return "an adapter name cannot contain '.' (torch module names cannot); choose another name"
    return None


def base_name(run: Run) -> str:
    """The base's name in the API: its hub id, or a local model directory's name."""
    base = run.recipe.model.base
    return Path(base).name if Path(base).expanduser().exists() else base


def same_base(first: Run, other: Run) -> str | None:
    """Why `other` was not trained on `first`'s base (id, revision, weights sha256 from the manifests), or None."""
    a = {"id": first.recipe.model.base, **(first.manifest.get("base_model") or {})}
    b = {"id": other.recipe.model.base, **(other.manifest.get("base_model") or {})}
    weights_a, weights_b = a.get("weights_sha256"), b.get("weights_sha256")
    if weights_a and weights_b:
        return None if weights_a == weights_b else f"its base weights' sha256 differ ({b.get('id')} vs {a.get('id')})"
    if a.get("id") != b.get("id"):
        return f"model id {b.get('id')!r}, this server's base is {a.get('id')!r}"
    if a.get("revision") != b.get("revision"):
        return f"revision {b.get('revision')!r}, this server's base is at {a.get('revision')!r}"
    return None


# --- requests ------------------------------------------------------------------------------------------


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "stream": "yes" is a 400, not true

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    stop: str | list[str] | None = None  # not supported: refused (in `sampling`) rather than silently ignored
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0


def _unicode(value: Any) -> Any:
    """A lone surrogate (`"\\ud800"`) is valid JSON but not text: the tokenizer cannot encode it (a 400, not a 500)."""
    texts = [value] if isinstance(value, str) else [getattr(v, "text", v) for v in value]  # parts or prompts
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate escape (such as \\ud800), which is not text") from None
    return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    _content_is_unicode = field_validator("content")(_unicode)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]
    _prompt_is_unicode = field_validator("prompt")(_unicode)
    echo: Literal[False] = False


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's shape; its other fields (load_inplace ...) do not apply
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)


@dataclass
class Job:
    """One generation: what to run and what came of it."""

    name: str
    prompt: str
    sampling: Sampling
    counts: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)


# --- the app -----------------------------------------------------------------------------------------------


def create_app(models: Models, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over `models`; `api_key` (when set) is required in `Authorization: Bearer` on /v1, checked
    by `Guard` before the body is read (an unauthenticated client learns nothing, not even that its JSON is bad)."""
    limits = models.limits
    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return await _api_error(request, ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})").body(), status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": models.names()}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        data = []
        for s in models.served.values():
            root = str(s.run.adapter) if s.run else models.base_name
            parent = models.base_name if s.run else None
            data.append({"id": s.name, "object": "model", "created": s.created, "owned_by": "finetune",
                         "root": root, "parent": parent})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served = models.get(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = chat_prompt(served.tokenizer, messages)
        budget = body.max_completion_tokens or body.max_tokens
        job = Job(body.model, prompt, sampling(body, budget, prompt, served, models))
        models.admit()
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return sse(chat_chunks(models, job, request, usage))
        text = await complete(models, job, request)
        message = {"role": "assistant", "content": text}
        return response("chat.completion", job, {"message": message})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = models.get(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt: one prompt per request (got a list of {len(prompts)})", "prompt")
        job = Job(body.model, prompts[0], sampling(body, body.max_tokens, prompts[0], served, models))
        models.admit()
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return sse(completion_chunks(models, job, request, usage))
        text = await complete(models, job, request)
        return response("text_completion", job, {"text": text, "logprobs": None})

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(body: LoadAdapter) -> PlainTextResponse:
        name = models.add(body.lora_path, body.lora_name)
        log.info("loaded adapter %s from %s", name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: UnloadAdapter) -> PlainTextResponse:
        models.remove(body.lora_name)
        log.info("unloaded adapter %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return Guard(app, limits.max_body_bytes, api_key)


def validation_error(errors: list[dict]) -> ApiError:
    """A request that does not parse or fit the schema: the first problem, with the parameter it concerns."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return ApiError(
            400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", code="invalid_json"
        )
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{param}: unsupported parameter", param, "unsupported_parameter")
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value")


def sampling(body: _Request, budget: int | None, prompt: str, served: Served, models: Models) -> Sampling:
    """The request's sampling, its budget and its prompt checked against the server's limits."""
    limits = models.limits
    if body.stop:
        raise ApiError(400, "stop: stop sequences are not supported by finetune serve; the run's end-of-turn "
                            "token ends each answer", "stop", "unsupported_parameter")  # fmt: skip
    if budget is not None and budget > limits.max_tokens:
        raise ApiError(400, f"max_tokens {budget} is above this server's limit of {limits.max_tokens} "
                            "(finetune serve --max-tokens)", "max_tokens", "max_tokens_exceeded")  # fmt: skip
    budget = budget or limits.max_tokens
    param = "prompt" if isinstance(body, CompletionRequest) else "messages"  # the parameter the prompt came from
    count = len(encode(served.tokenizer, prompt))
    if count == 0:
        raise ApiError(400, f"{param}: the prompt is empty (no tokens, and this tokenizer adds no start token): "
                            "the model needs at least one token to continue", param, "invalid_value")  # fmt: skip
    cap = limits.max_prompt_tokens or models.context
    if cap is not None and count > cap:
        raise ApiError(400, f"{param}: the prompt is {count} tokens, above this server's limit of {cap} prompt "
                            "tokens (finetune serve --max-prompt-tokens)", param, "prompt_too_long")  # fmt: skip
    if models.context is not None and count + budget > models.context:
        budget = models.context - count  # fits the context, as OpenAI servers clip the default
        if budget < 1:
            raise ApiError(400, f"{param}: the prompt ({count} tokens) fills the model's context of "
                                f"{models.context} tokens", param, "context_length_exceeded")  # fmt: skip
    return Sampling(budget, body.temperature, body.top_p, body.seed)


async def run_job(models: Models, job: Job, request: Request) -> AsyncIterator[str]:
    """Text pieces of the job's answer, generated in a worker thread that holds the model's lock.

    If the client goes away (or this generator is closed), the generation stops at the next token
    and the lock is released for the next request.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    def work() -> None:
        try:
            with models.using(job.name) as (served, model):
                if not job.cancel.is_set():  # the client may have left while waiting
                    pieces = stream(model, served.tokenizer, job.prompt, job.sampling, job.cancel, job.counts)
                    for piece in pieces:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                    c = job.counts
                    log.info("%s: %d prompt + %d completion tokens, %s", job.name, c["prompt_tokens"],
                             c["completion_tokens"], c["finish_reason"])  # fmt: skip
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, end)

    threading.Thread(target=work, name=f"finetune-serve-{job.name}", daemon=True).start()
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                continue
            if item is end:
                return
            if isinstance(item, ApiError):
                raise item
            if isinstance(item, BaseException):
                raise RuntimeError(f"generation failed: {type(item).__name__}: {item}") from None
            yield item
    finally:
        job.cancel.set()  # a no-op when the answer is complete; otherwise frees the model at the next token


async def complete(models: Models, job: Job, request: Request) -> str:
    return "".join([piece async for piece in run_job(models, job, request)])


def response(kind: str, job: Job, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": job.name,
        "choices": [{"index": 0, **choice, "finish_reason": job.counts.get("finish_reason", "length")}],
        "usage": usage(job),
    }


def usage(job: Job) -> dict[str, int]:
    p, c = job.counts.get("prompt_tokens", 0), job.counts.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def chat_chunks(models: Models, job: Job, request: Request, with_usage: bool) -> AsyncIterator[dict]:
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": job.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    yield chunk({"role": "assistant", "content": ""})
    async for chunk_or_error in _guarded(run_job(models, job, request)):
        if isinstance(chunk_or_error, dict):
            yield chunk_or_error
            return
        yield chunk({"content": chunk_or_error})
    yield chunk({}, job.counts.get("finish_reason", "length"))
    if with_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": job.name,
               "choices": [], "usage": usage(job)}  # fmt: skip


async def completion_chunks(models: Models, job: Job, request: Request, with_usage: bool) -> AsyncIterator[dict]:
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None = None) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": job.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

    async for piece in _guarded(run_job(models, job, request)):
        if isinstance(piece, dict):
            yield piece
            return
        yield chunk(piece)
    yield chunk("", job.counts.get("finish_reason", "length"))
    if with_usage:
        yield {"id": ident, "object": "text_completion", "created": created, "model": job.name, "choices": [],
               "usage": usage(job)}  # fmt: skip


async def _guarded(pieces: AsyncIterator[str]) -> AsyncIterator[str | dict]:
    """Once a stream has started its status is sent: a failure becomes an error event, logged in one line."""
    try:
        async for piece in pieces:
            yield piece
    except ApiError as e:
        log.info("stream ended early: %s", e.message)
        yield e.body()
    except Exception as e:
        log.error("stream failed: %s: %s", type(e).__name__, e)
        yield ApiError(500, f"internal error ({type(e).__name__})").body()


def authorization_error(header: str, api_key: str | None) -> ApiError | None:
    """The 401 for a request whose `Authorization` header does not carry `api_key`; None when it does (or no key)."""
    if api_key is None:
        return None
    scheme, _, token = header.partition(" ")
    if not header:
        return ApiError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return ApiError(401, "incorrect API key", code="invalid_api_key")
    return None


class Guard:
    """Outermost ASGI layer, before anything is parsed: the API key on /v1 (401), then a body above `limit` bytes
    (413 naming the limit); and an exception that Starlette re-raises after its 500 answer (to let servers print
    a traceback) stops here."""

    def __init__(self, app: Any, limit: int, api_key: str | None = None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope.get("path", "").startswith("/v1"):
            denied = authorization_error(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
            if denied is not None:
                log.info("%s %s -> 401 %s", scope.get("method"), scope.get("path"), denied.message)
                return await self._send(send, 401, denied.body())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await self._refuse(send)
        except Exception:  # already answered with a 500 and logged in one line by the app's handler
            if not started:
                await self._send(send, 500, ApiError(500, "internal error").body())

    async def _refuse(self, send: Any) -> None:
        error = ApiError(413, f"request body above this server's limit of {self.limit} bytes "
                              "(finetune serve --max-body-bytes)", code="request_too_large")  # fmt: skip
        log.info("request refused: %s", error.message)
        await self._send(send, 413, error.body())

    @staticmethod
    async def _send(send: Any, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


# --- the `finetune serve` stage ------------------------------------------------------------------------------


def check_engine(engine: str) -> None:
    """`transformers` serves from this process; `vllm` starts vLLM's own server on the runs."""
    if engine not in ENGINES:
        raise UserError(f"--engine: transformers or vllm, not {engine!r}")


def check_bind(host: str, api_key: str | None) -> None:
    """Only localhost without an API key: anything else would expose the models to the network unauthenticated."""
    if host not in LOCAL_HOSTS and not api_key:
        raise UserError(
            f"--host {host}: binding to a non-local address needs an API key (--api-key or {API_KEY_ENV}); "
            "without one, only 127.0.0.1 / localhost / ::1"
        )


def load_models(targets: list[str | Path], limits: Limits) -> Models:
    """The first run's base and adapter, then every other run's adapter on the same base (checked)."""
    from finetune.inference.loaded import is_merged_dir, load
    from finetune.runs import resolve_run

    if not targets:
        raise UserError("give at least one run directory")
    for target in targets:
        if is_merged_dir(resolve_run(target)):
            raise UserError(f"{target}: a merged model; serve takes run directories (adapters on one base)")
    try:
        models = Models(load(targets[0]), limits)
        for target in targets[1:]:
            models.add(target)
    except ApiError as e:
        raise UserError(e.message) from None
    return models


def serve(
    targets: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    ready: Any = None,
) -> None:
    """Load the runs and serve them until SIGTERM/SIGINT, which drains in-flight requests (uvicorn)."""
    import signal

    import uvicorn

    check_bind(host, api_key)
    models = load_models(targets, limits or Limits())
    if ready is not None:
        ready(models)
    config = uvicorn.Config(create_app(models, api_key), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=60, access_log=True)  # fmt: skip
    # uvicorn drains on SIGTERM, then re-raises it to the handler it found: a no-op one makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()


# --- scale-out: vLLM ---------------------------------------------------------------------------------------


@dataclass
class VllmPlan:
    command: list[str]
    max_lora_rank: int
    notes: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command)}".strip()


def vllm_plan(targets: list[str | Path], host: str, port: int) -> VllmPlan:
    """vLLM's OpenAI server with the runs as LoRA modules, once export's vLLM check found nothing in any run's
    adapter that vLLM refuses. The names, dtype and template are our engine's (see finetune.inference.vllm),
    so clients carry over between the two engines."""
    from finetune.inference.vllm import Adapter, Launch, command, find_python, platform_of
    from finetune.runs import open_run
    from finetune.runtimes import adapter_facts, adapter_vllm

    runs = [open_run(t) for t in targets]
    if not runs:
        raise UserError("give at least one run directory")
    problems, notes, ranks = [], [], []
    for run in runs:
        verdict = adapter_vllm(adapter_facts(run), run)
        if verdict["works"] is False:
            problems.append(f"{run.root}: {verdict['summary']}: {'; '.join(verdict['reasons'])}")
            continue
        ranks.append(verdict["max_lora_rank"])
        notes += [f"{run.recipe.name}: {r}" for r in verdict["reasons"]]
        refused = same_base(runs[0], run)
        if refused:
            problems.append(f"{run.root}: trained on another base than {runs[0].root}: {refused}")
    names = [r.recipe.name for r in runs]
    if len(set(names)) != len(names):
        problems.append(f"two runs share a name ({', '.join(names)}); vLLM selects adapters by name")
    if base_name(runs[0]) in names:
        problems.append(f"a run is named like the base ({base_name(runs[0])}); vLLM could not tell them apart")
    if problems:
        raise UserError(problems)
    first = runs[0]
    template = first.adapter / "chat_template.jinja"
    launch = Launch(
        base=first.recipe.model.base, base_name=base_name(first), dtype=first.recipe.model.dtype,
        chat_template=template if template.is_file() else None,
        adapters=tuple(Adapter(r.recipe.name, r.adapter) for r in runs), max_lora_rank=max(ranks),
        host=host, port=port, revision=first.recipe.model.revision,
        trust_remote_code=first.recipe.model.trust_remote_code,
    )  # fmt: skip
    python = find_python()
    cmd = command(launch, python, platform_of(python))
    notes += cmd.notes
    if adapter_facts(first)["quantization_in_training"] != "none":
        notes.append(
            "vLLM serves the base unquantized (or with its own quantization), not the bitsandbytes 4-bit base used in training"
        )
    return VllmPlan(cmd.argv, max(ranks), notes, cmd.env)


def run_vllm(plan: VllmPlan, api_key: str | None) -> int:
    """Start vLLM (its API key through VLLM_API_KEY, never on the command line); stops with us, waited for."""
    from finetune.inference.vllm import VllmCommand, run

    return run(VllmCommand(plan.command, plan.env, plan.notes), api_key)
