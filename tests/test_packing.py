"""Padding-free batches and packing: rows share a sequence with no attention or position leak across rows;
padding-free keeps the batches, and so the training, exactly as padded batches have them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import finetune, losses, write_recipe

from finetune.recipe.load import load_recipe


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_see_only_themselves(tiny_model_dir, family):
    """Logits of rows packed with reset position ids equal the logits of each row alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), attn_implementation="sdpa").eval()
    rows = [[5, 9, 13, 200, 7], [42, 17, 3], [101, 102, 103, 104, 105, 106]]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": r} for r in rows])
    assert batch["input_ids"].shape == (1, sum(map(len, rows)))
    assert batch["position_ids"][0].tolist() == [i for r in rows for i in range(len(r))]
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): transformers detects packing only without a KV cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row])).logits[0]
            assert torch.allclose(packed[start : start + len(row)], alone, atol=1e-5), (family, row)
            start += len(row)


@pytest.mark.slow
def test_training_with_packing_keeps_the_assistant_masks(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir())
    result = finetune("train", str(recipe), "--set", "data.packing=true", "--set", "train.batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert losses[-1] < losses[0]
    # 2 packed sequences of up to 64 tokens per step hold more than 2 rows of ~20 tokens
    assert logs[0]["num_tokens"] > 2 * 25


def test_length_grouped_order_is_fixed_by_seed_and_epoch_and_cuts_padding():
    import random

    from finetune.trainer import GroupedByLength

    lengths = [random.Random(i).randint(5, 500) for i in range(4000)]
    epoch = [0]
    sampler = GroupedByLength(lengths, batch_size=16, seed=7, epoch=lambda: epoch[0])
    first, again = list(sampler), list(sampler)
    epoch[0] = 1
    second = list(sampler)
    assert first == again and first != second and sorted(first) == list(range(4000))

    def padded(order):  # tokens computed when every batch is padded to its longest row
        return sum(16 * max(lengths[i] for i in order[s : s + 16]) for s in range(0, len(order), 16))

    shuffled = random.Random(0).sample(range(4000), 4000)
    assert padded(first) < 0.6 * padded(shuffled)


@pytest.mark.slow
def test_padding_free_batches_train_exactly_as_padded_ones(tiny_model_dir, tmp_path, monkeypatch):
    """The GPU default (`data.padding_free: auto`, on with flash attention) run here with SDPA: the same rows in
    every step and the same loss, step for step, as TRL's padded batches. What packing is not: docs/guides/data.md."""
    from finetune.train import train

    monkeypatch.chdir(tmp_path)
    curves = {}
    for flat in (False, True):
        run = tmp_path / "runs" / f"flat-{flat}"
        sets = [f"output_dir={run}", f"data.padding_free={str(flat).lower()}", "eval.compare_base=false"]
        result = train(load_recipe(write_recipe(tmp_path, tiny_model_dir()), sets), progress=False)
        assert result.steps == 8
        curves[flat] = (losses(run), result.eval.tuned.loss)
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["speed"]["padding_free"] is flat and manifest["speed"]["packing"] is False
    (padded, padded_eval), (flat_curve, flat_eval) = curves[False], curves[True]
    assert len(padded) == 8 and padded[-1] < padded[0]
    assert flat_curve == pytest.approx(padded, rel=1e-4), "the same batches, the same loss at every step"
    assert flat_eval == pytest.approx(padded_eval, rel=1e-4)
