"""Model loading blocks: the new tokens of data.add_special_tokens (room made, rows trained, nothing else moved).

The whole path through the CLI (train, merge, eval, plain PEFT, resume) is in scripts/lora_options_e2e.py; these
run one optimizer step in memory on a tiny model, a second or two each.
"""

from __future__ import annotations

import pytest
import tiny
import torch

from finetune.data.templates import apply_chat_template
from finetune.modeling import fit_vocabulary, lora_config, train_new_tokens
from finetune.recipe.schema import Recipe
from finetune.trainer import _output_rows_readable


def _recipe(base, mode: str) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"base": str(base)}, "lora": {"rank": 4, "new_tokens": mode},
        "data": {"train": [{"path": "t.jsonl"}], "chat_template": "chatml", "add_special_tokens": "auto"},
    })  # fmt: skip


@pytest.fixture(scope="module")
def base_models(tmp_path_factory, tiny_base_tokenizer_dir):
    built = {}

    def get(family):
        if family not in built:
            built[family] = tiny.build_model(family, tmp_path_factory.mktemp(family), tiny_base_tokenizer_dir)
        return built[family]

    return get


def _step(model, ids: list[int]) -> None:
    """One SGD step on a sequence that holds the new tokens, as input and as labels."""
    batch = torch.tensor([[ids[0], 5, 6, ids[1], 7, ids[0]]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


@pytest.mark.parametrize(("family", "mode"), [("llama", "trainable_rows"), ("gemma", "trainable_rows"),
                                              ("llama", "modules_to_save")])  # fmt: skip
def test_the_new_tokens_rows_are_made_and_trained_and_with_trainable_rows_nothing_else(family, mode, base_models):
    """llama's output layer is untied, gemma's tied (it follows its embeddings' rows); modules_to_save trains both
    matrices whole, so there the old rows move too."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_models(family)
    tokenizer = AutoTokenizer.from_pretrained(base)
    size = len(tokenizer)
    added = apply_chat_template(tokenizer, "chatml", "auto")
    ids = tokenizer.convert_tokens_to_ids(added)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    recipe = _recipe(base, mode)
    config = lora_config(recipe, ["q_proj", "v_proj"])
    record = train_new_tokens(recipe, model, config, ids)
    assert record["resized"] and record["embedding_rows"] == size + 2 == model.config.vocab_size
    assert record["layers"] == (["embed_tokens"] if family == "gemma" else ["embed_tokens", "lm_head"])
    start = model.get_input_embeddings().weight[ids].detach().clone()
    peft_model = get_peft_model(model, config)
    _output_rows_readable(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if mode == "trainable_rows":
        assert all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable), trainable
        assert peft_model.get_output_embeddings().bias is None
    _step(peft_model, ids)
    merged = peft_model.merge_and_unload()
    now_in, now_out = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.allclose(now_in[ids], start), "the new rows learned"
    if family == "gemma":
        assert now_out.data_ptr() == now_in.data_ptr(), "still tied"
    if mode == "trainable_rows":
        assert torch.equal(now_in[:size], before_in) and torch.equal(now_out[:size], before_out)
    else:
        assert not torch.equal(now_in[:size], before_in)


def test_a_vocabulary_padded_beyond_the_tokenizer_is_never_shrunk(base_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_models("llama"))
    rows = model.get_input_embeddings().weight.shape[0]
    assert not fit_vocabulary(model, rows - 3)
    assert fit_vocabulary(model, rows + 2) and model.get_output_embeddings().weight.shape[0] == rows + 2
