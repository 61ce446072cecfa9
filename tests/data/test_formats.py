"""Row formats: what each becomes (samples for SFT and GRPO, judged sides for DPO and KTO) and how bad rows are named.

Masks and the common SFT rows are in data/test_prepare.py; these are the cases that decide what a preference
method trains on, and the reasons by which skipped rows are counted.
"""

from __future__ import annotations

import pytest

from finetune.data.formats import MAX_TURNS, BadRow, Judged, Sample, to_judged, to_sample
from finetune.recipe.schema import DataSource


def source(fmt: str, **kw) -> DataSource:
    return DataSource(path="/x.jsonl", format=fmt, **kw)


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def test_a_preference_row_is_a_chosen_then_rejected_pair_on_one_prompt():
    chosen, rejected = to_judged({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "f:1", source("preference"), 7)
    assert chosen == Judged("f:1", (("user", "Q"),), "good", True, 7)
    assert rejected == Judged("f:1", (("user", "Q"),), "bad", False, 7)


def test_a_prompt_given_as_turns_keeps_the_system_turn_and_answers_may_repeat_it():
    prompt = turns(("system", "Be brief."), ("user", "Q"))
    row = {"prompt": prompt, "chosen": [*prompt, *turns(("assistant", "good"))], "rejected": "bad"}
    chosen, rejected = to_judged(row, "f:1", source("preference"))
    assert chosen.prompt == rejected.prompt == (("system", "Be brief."), ("user", "Q"))
    assert (chosen.completion, rejected.completion) == ("good", "bad")


def test_an_answer_conversation_that_does_not_repeat_the_prompt_is_refused():
    row = {"prompt": turns(("user", "Q")), "chosen": turns(("user", "other"), ("assistant", "good")), "rejected": "b"}
    with pytest.raises(BadRow, match="must repeat the prompt turns exactly"):
        to_judged(row, "f:1", source("preference"))


def test_an_unpaired_row_is_one_judged_side_and_its_label_must_be_a_boolean():
    [side] = to_judged({"prompt": "Q", "completion": "A", "label": False}, "f:2", source("unpaired"))
    assert (side.prompt, side.completion, side.desirable, side.pair) == ((("user", "Q"),), "A", False, -1)
    with pytest.raises(BadRow, match="'label' must be true or false, got 1"):
        to_judged({"prompt": "Q", "completion": "A", "label": 1}, "f:2", source("unpaired"))


def test_an_sft_format_has_no_sides_for_a_preference_method():
    with pytest.raises(BadRow, match="format messages has no chosen/rejected answers"):
        to_judged({"messages": turns(("user", "Q"), ("assistant", "A"))}, "f:1", source("messages"))


def test_a_judged_side_as_a_sample_ends_on_its_own_completion():
    side = Judged("f:1", (("system", "S"), ("user", "Q")), "A", True)
    assert side.as_sample() == Sample("f:1", messages=(("system", "S"), ("user", "Q"), ("assistant", "A")))


def test_alpaca_puts_its_system_first_and_an_empty_input_adds_nothing():
    row = {"instruction": "Do it", "input": "  ", "output": "done", "system": "Be kind."}
    sample = to_sample(row, "f:1", source("alpaca"))
    assert sample.messages == (("system", "Be kind."), ("user", "Do it"), ("assistant", "done"))


def test_completion_rows_keep_their_text_exactly_and_an_empty_prompt_is_allowed():
    sample = to_sample({"prompt": "", "completion": " 4\n"}, "f:1", source("completion"))
    assert (sample.is_chat, sample.prompt, sample.completion) == (False, "", " 4\n")
    renamed = to_sample({"body": "all of it"}, "f:1", source("completion", columns={"text": "body"}))
    assert (renamed.prompt, renamed.completion) == ("", "all of it")


def test_the_same_row_from_two_places_has_one_duplicate_key():
    a = to_sample({"messages": turns(("user", "Q"), ("assistant", "A"))}, "train.jsonl:1", source("messages"))
    b = to_sample({"prompt": "Q", "chosen": "A", "rejected": "B"}, "eval.jsonl:9", source("preference"))
    assert a != b and a.key() == b.key()


@pytest.mark.parametrize(
    ("row", "reason", "message"),
    [
        ("just text", "not_an_object", "expected an object with fields, got str"),
        ({"messages": turns(*[("user", "q"), ("assistant", "a")] * (MAX_TURNS // 2 + 1))}, "too_many_turns",
         f"at most {MAX_TURNS} per row"),
        ({"messages": turns(("human", "q"), ("gpt", "a"))}, "unknown_role", "ShareGPT's human/gpt"),
        ({"messages": turns(("user", "q"), ("user", "a"))}, "turn_order", "turn 1 is 'user' where 'assistant'"),
        ({"messages": turns(("user", "q"), ("assistant", "a"), ("system", "late"))}, "turn_order",
         "turn 2 is 'system'"),
        ({"messages": [{"role": "user"}]}, "wrong_type", "turn 0 must be an object with 'role' and 'content'"),
    ],
)  # fmt: skip
def test_a_bad_row_names_what_is_wrong_and_the_reason_it_is_counted_by(row, reason, message):
    with pytest.raises(BadRow, match=message) as e:
        to_sample(row, "f:1", source("messages"))
    assert e.value.reason == reason


def test_a_renamed_column_that_is_missing_is_named_with_the_field_it_stands_for():
    with pytest.raises(BadRow, match=r"missing field 'conv' \(the 'messages' of format messages\)"):
        to_sample({"messages": []}, "f:1", source("messages", columns={"messages": "conv"}))
