"""Generation, the one decoder of eval, chat and serve: stop ids, greedy by default, batches that answer as single
prompts do, and streaming that joins to the same answer. On the tiny random llama, no training."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from finetune.data.templates import render
from finetune.generation import Sampling, chat_prompt, generate, stop_ids, stream

PROMPTS = ["Reverse: red blue green", "Reverse: lime", "Reverse: alpha beta gamma delta epsilon zeta"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    return model, tokenizer, [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.mark.parametrize(
    ("configured", "expected"), [(None, [7]), (3, [3, 7]), ([3, 7], [3, 7]), ([7], [7]), ([], [7])]
)
def test_stop_ids_are_the_configs_eos_ids_plus_the_tokenizers_end_of_turn_once(configured, expected):
    assert stop_ids(SimpleNamespace(eos_token_id=configured), SimpleNamespace(eos_token_id=7)) == expected


def test_without_a_tokenizer_eos_the_configs_ids_are_the_stop_ids():
    assert stop_ids(SimpleNamespace(eos_token_id=3), SimpleNamespace(eos_token_id=None)) == [3]
    assert stop_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=None)) == []


def test_temperature_zero_is_greedy_and_sampling_uses_top_p_alone():
    assert Sampling(8).kwargs() == {"do_sample": False}
    assert Sampling(8, temperature=0.7, top_p=0.9).kwargs() == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}  # fmt: skip


def test_the_chat_prompt_is_the_template_up_to_the_assistants_turn(loaded):
    _, tokenizer, prompts = loaded
    assert prompts[0] == render(tokenizer, [{"role": "user", "content": PROMPTS[0]}], generation_prompt=True)
    assert prompts[0].endswith("<|im_start|>assistant\n")


def test_a_left_padded_batch_answers_exactly_as_each_prompt_alone_and_padding_side_is_restored(loaded):
    model, tokenizer, prompts = loaded
    tokenizer.padding_side = "right"
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"
    assert generate(model, tokenizer, prompts, 6, 3) == together, "greedy: the same answer every time"


def test_streamed_pieces_join_to_the_generated_answer_and_count_its_tokens(loaded):
    model, tokenizer, prompts = loaded
    counts: dict = {}
    pieces = list(stream(model, tokenizer, prompts[0], Sampling(6), counts=counts))
    assert "".join(pieces) == generate(model, tokenizer, prompts[:1], 6, 1)[0]
    assert counts["prompt_tokens"] == len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    assert 1 <= counts["completion_tokens"] <= 6
    assert counts["finish_reason"] == ("length" if counts["completion_tokens"] == 6 else "stop")


def test_a_cancelled_stream_stops_at_the_next_token(loaded):
    model, tokenizer, prompts = loaded
    cancel, counts = threading.Event(), {}
    cancel.set()
    list(stream(model, tokenizer, prompts[0], Sampling(50), cancel=cancel, counts=counts))
    assert (counts["completion_tokens"], counts["finish_reason"]) == (1, "cancelled")


def test_a_seeded_sample_repeats(loaded):
    model, tokenizer, prompts = loaded
    sampling = Sampling(8, temperature=1.0, seed=3)
    first = "".join(stream(model, tokenizer, prompts[1], sampling))
    assert "".join(stream(model, tokenizer, prompts[1], sampling)) == first
