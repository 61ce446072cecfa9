"""Chat templates: which template a tokenizer gets, what the model is prompted with, and masks that cannot shift.

The per-template assistant masks are in data/test_prepare.py; these are the rules around them.
"""

from __future__ import annotations

import pytest

from finetune.data.formats import Sample
from finetune.data.templates import (
    IGNORE,
    apply_chat_template,
    builtin_template,
    encode,
    prompt_and_reference,
    segments,
    tokenize,
)
from finetune.errors import UserError

CHAT = Sample("t.jsonl:4", messages=(("system", "Be brief."), ("user", "Reverse: red blue"), ("assistant", "blue red")))


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_auto_keeps_the_tokenizers_template_a_name_or_a_file_replaces_it(tokenizer, tmp_path):
    own = tokenizer.chat_template
    apply_chat_template(tokenizer, "auto")
    assert tokenizer.chat_template == own
    apply_chat_template(tokenizer, "llama3")
    assert tokenizer.chat_template == builtin_template("llama3") != own
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    apply_chat_template(tokenizer, str(path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"


def test_auto_on_a_tokenizer_without_a_template_says_which_to_set(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(UserError, match=r"has no chat template of its own; set one of .*chatml"):
        apply_chat_template(tokenizer, "auto")


def test_the_prompt_is_the_chat_up_to_the_generation_prompt_and_the_reference_the_last_answer(tokenizer):
    prompt, reference = prompt_and_reference(tokenizer, CHAT)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse: red blue<|im_end|>\n" \
                     "<|im_start|>assistant\n"  # fmt: skip
    assert reference == "blue red"
    raw = Sample("t.jsonl:1", prompt="2+2=", completion=" 4")
    assert prompt_and_reference(tokenizer, raw) == ("2+2=", " 4")


def test_the_prompt_tokens_are_those_of_training_with_no_special_token_added(tokenizer):
    """The rendered prompt is a prefix of the trained text and its ids a prefix of the trained ids."""
    prompt, _ = prompt_and_reference(tokenizer, CHAT)
    [(ids, labels)] = tokenize(tokenizer, [segments(tokenizer, CHAT, "assistant")])
    assert ids[: len(encode(tokenizer, prompt))] == encode(tokenizer, prompt)
    assert all(label == IGNORE for label in labels[: len(encode(tokenizer, prompt))])
    assert labels[len(encode(tokenizer, prompt))] != IGNORE, "the answer's first token is trained"


def test_a_template_that_renders_a_conversation_unlike_its_prefixes_is_refused_naming_the_row(tokenizer, tmp_path):
    """A mask found from prefixes would be wrong: here the template numbers the turns from the end."""
    path = tmp_path / "countdown.jinja"
    path.write_text("{% for m in messages %}{{ messages|length - loop.index }}:{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}>{% endif %}")  # fmt: skip
    apply_chat_template(tokenizer, str(path))
    with pytest.raises(UserError, match=r"t\.jsonl:4: the chat template renders a conversation differently"):
        segments(tokenizer, CHAT, "assistant")
    assert segments(tokenizer, CHAT, "all") == [(tokenizer.apply_chat_template(CHAT.as_messages(), tokenize=False),
                                                 True)]  # fmt: skip


def test_labels_follow_the_character_pieces_even_where_tokens_cross_them(tokenizer):
    """A piece boundary inside a token (" red" is one): the token takes the mark of the piece it starts in, and the
    whole text is tokenized once, so the ids are those of the unsplit text."""
    [(ids, labels)] = tokenize(tokenizer, [[("Reverse: re", False), ("d blue", True)]])
    assert tokenizer.convert_ids_to_tokens(ids) == ["Reverse", ":", "Ġred", "Ġblue"]
    assert labels == [IGNORE, IGNORE, IGNORE, ids[3]]
    [(_, labels)] = tokenize(tokenizer, [[("Reverse:", False), (" red blue", True)]])
    assert labels == [IGNORE, IGNORE, ids[2], ids[3]]


def test_a_raw_completion_is_trained_with_the_end_of_sequence_and_its_prompt_is_not(tokenizer):
    raw = Sample("t.jsonl:1", prompt="2+2=", completion=" 4")
    assert segments(tokenizer, raw, "assistant") == [("2+2=", False), (" 4<|im_end|>", True)]
    assert segments(tokenizer, raw, "all") == [("2+2=", True), (" 4<|im_end|>", True)]


def test_a_template_whose_markers_the_tokenizer_lacks_warns_naming_them(tokenizer, tmp_path):
    import warnings

    path = tmp_path / "turns.jinja"
    path.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}")
    with pytest.warns(
        UserWarning,
        match=r"data.chat_template .*turns.jinja: <\|turn\|> not in the tokenizer's vocab.*"
        r"set data.add_special_tokens: auto",
    ):
        apply_chat_template(tokenizer, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ChatML's markers are this tokenizer's own tokens: nothing to say
        apply_chat_template(tokenizer, "chatml")


@pytest.fixture
def base_tokenizer(tiny_base_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_tokenizer_dir)


def test_auto_adds_the_templates_missing_markers_as_single_special_tokens_after_the_vocabulary(base_tokenizer):
    """ChatML on a base tokenizer: each marker was several byte tokens; now one new id each, never split, dropped
    when decoding, and the rendered conversation tokenizes to them (no warning left to give)."""
    import warnings

    size = len(base_tokenizer)
    assert len(encode(base_tokenizer, "<|im_start|>")) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        added = apply_chat_template(base_tokenizer, "chatml", "auto")
    assert added == ["<|im_start|>", "<|im_end|>"]
    assert base_tokenizer.convert_tokens_to_ids(added) == [size, size + 1] and len(base_tokenizer) == size + 2
    assert set(added) <= set(base_tokenizer.all_special_tokens)
    prompt, _ = prompt_and_reference(base_tokenizer, CHAT)
    ids = encode(base_tokenizer, prompt)
    assert ids[0] == size and ids.count(size + 1) == 2
    assert base_tokenizer.decode(ids, skip_special_tokens=True).startswith("system\nBe brief.")
    assert base_tokenizer.eos_token == "<|im_end|>", "generation stops where the template ends an answer"


def test_none_keeps_the_vocabulary_and_warns_that_auto_would_add_them(base_tokenizer):
    size = len(base_tokenizer)
    with pytest.warns(
        UserWarning,
        match=r"<\|im_start\|>, <\|im_end\|> not in the tokenizer's vocabulary.*"
        r"data.add_special_tokens: auto",
    ):
        assert apply_chat_template(base_tokenizer, "chatml", "none") == []
    assert len(base_tokenizer) == size


def test_a_listed_token_is_added_and_one_the_tokenizer_has_is_refused_naming_its_id(base_tokenizer):
    size = len(base_tokenizer)
    with pytest.warns(UserWarning, match=r"<\|im_end\|> not in"):  # the list does not cover ChatML's end of turn
        assert apply_chat_template(base_tokenizer, "chatml", ["<|im_start|>", "<tool>"]) == ["<|im_start|>", "<tool>"]
    assert len(base_tokenizer) == size + 2
    pad = base_tokenizer.convert_tokens_to_ids("<|pad|>")
    with pytest.raises(UserError, match=rf"recipe.yaml:9:3 data.add_special_tokens: <\|pad\|> is already token {pad}"):
        apply_chat_template(base_tokenizer, "chatml", ["<|pad|>", "<new>"], where="recipe.yaml:9:3")
