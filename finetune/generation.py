"""Generation with a run's own tokenizer, chat template and end-of-turn stop ids: one implementation.

`finetune eval`, `finetune chat` and `finetune serve` all decode through these functions, so an
adapter answers the same in each (a template or stop token that differs between front ends is a
known way for a good adapter to produce gibberish or never stop).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria

from finetune.data.templates import encode, render

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: greedy when temperature is 0 (the default, as `eval` decodes)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A conversation rendered by the run's chat template up to the assistant's turn, as in training and eval."""
    return render(tokenizer, messages, generation_prompt=True)


def stop_ids(generation_config: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the generation config's eos ids plus the tokenizer's eos (the template's end of turn)."""
    ids = generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _decoding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampling: Sampling) -> dict[str, Any]:
    """The generate() arguments every caller shares: new tokens, stop ids, pad id, greedy or sampling."""
    return {
        "max_new_tokens": sampling.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop_ids(model.generation_config, tokenizer),
        **sampling.kwargs(),
    }


def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache; returns only the new text."""
    return generate_timed(model, tokenizer, prompts, max_new_tokens, batch_size).texts


@dataclass(frozen=True)
class Generated:
    """Answers with their cost: generated tokens per answer (up to and including the stop token) and the wall
    seconds of the batch each was generated in (what a caller sending that batch waits)."""

    texts: list[str]
    tokens: list[int]
    seconds: list[float]


@torch.no_grad()
def generate_timed(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch_size: int
) -> Generated:
    """`generate`, with each answer's token count and its batch's latency."""
    import time

    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = set(stop_ids(model.generation_config, tokenizer))
    texts: list[str] = []
    tokens: list[int] = []
    seconds: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            began = time.perf_counter()
            generated = model.generate(**batch.to(device), **_decoding(model, tokenizer, Sampling(max_new_tokens)))
            new = generated[:, batch["input_ids"].shape[1] :].cpu()  # to the CPU: the batch's work is done
            elapsed = time.perf_counter() - began
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
            tokens += [_answer_length(row.tolist(), stops) for row in new]
            seconds += [elapsed] * len(new)
    finally:
        tokenizer.padding_side = side
    return Generated(texts, tokens, seconds)


def _answer_length(ids: list[int], stops: set[int]) -> int:
    """Tokens generated for one answer: up to and including its first stop id (the rest is the batch's padding)."""
    for i, token in enumerate(ids):
        if token in stops:
            return i + 1
    return len(ids)


class Cancelled(StoppingCriteria):
    """A stopping criterion that ends generation when `event` is set (a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    sampling: Sampling,
    cancel: threading.Event | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[str]:
    """Text pieces of one answer as they are generated (transformers' TextIteratorStreamer).

    The same decoding as `generate` for a batch of one; joined, the pieces are the whole answer.
    Setting `cancel` stops generation at the next token. `counts` receives prompt and completion
    token counts when the answer ends.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = cancel or threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.no_grad():
                result["out"] = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Cancelled(cancel)]),
                    **_decoding(model, tokenizer, sampling),
                )  # fmt: skip
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, name="finetune-generate", daemon=True)
    thread.start()
    finished = False
    try:
        yield from (piece for piece in streamer if piece)  # the streamer also emits empty pieces
        finished = True
    finally:
        if not finished:  # the consumer stopped early: free the model at the next token
            cancel.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    if counts is not None:
        new = result["out"][0, ids.shape[1] :]
        stops = set(stop_ids(model.generation_config, tokenizer))
        counts.update(prompt_tokens=ids.shape[1], completion_tokens=len(new))
        stopped = len(new) and int(new[-1]) in stops
        counts["finish_reason"] = "stop" if stopped else "cancelled" if cancel.is_set() else "length"
