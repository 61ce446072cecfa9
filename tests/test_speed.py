"""The `auto` speed settings: pure decisions from a setting and the machine's facts, and how train makes them once."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tiny
from helpers import write_recipe

import finetune.data.prepare as prepare_module
import finetune.plan as plan_module
import finetune.train as train_module
from finetune.errors import UserError
from finetune.machine import Machine, this_machine
from finetune.plan import plan
from finetune.recipe.load import load_recipe
from finetune.speed import decide_attention, decide_checkpointing, decide_liger, decide_padding_free

CPU = Machine(cuda=False, bf16=False, gpu_bytes=None, flash_attn=False, liger_kernel=False)
GPU = Machine(cuda=True, bf16=True, gpu_bytes=80 * 10**9, flash_attn=True, liger_kernel=True)


def test_on_the_cpu_auto_means_sdpa_padded_batches_no_checkpointing_no_liger():
    import torch

    attention = decide_attention("auto", torch.float32, CPU)
    assert attention == "sdpa"
    assert decide_padding_free("auto", attention) is False
    assert decide_checkpointing("auto", CPU, peak_bytes=None) is False
    assert decide_liger("auto", CPU) is False


def test_on_a_gpu_with_flash_attn_auto_means_flash_padding_free_and_liger():
    import torch

    assert decide_attention("auto", torch.bfloat16, GPU) == "flash_attention_2"
    assert decide_attention("auto", torch.float32, GPU) == "sdpa", "flash attention runs in half precision only"
    assert decide_attention("auto", torch.bfloat16, dataclasses.replace(GPU, flash_attn=False)) == "sdpa"
    assert decide_padding_free("auto", "flash_attention_2") is True
    assert decide_liger("auto", GPU) is True


def test_explicit_settings_are_kept_as_written():
    import torch

    assert decide_attention("eager", torch.bfloat16, GPU) == "eager"
    assert decide_padding_free(True, "sdpa") is True
    assert decide_checkpointing(True, CPU, peak_bytes=None) is True
    assert decide_checkpointing(False, GPU, peak_bytes=10**12) is False


def test_checkpointing_turns_on_only_where_the_peak_does_not_fit():
    gpu = GPU.gpu_bytes
    assert decide_checkpointing("auto", GPU, peak_bytes=gpu // 2) is False
    assert decide_checkpointing("auto", GPU, peak_bytes=gpu) is True  # over 90% of the GPU
    assert decide_checkpointing("auto", GPU, peak_bytes=None) is True  # unknown: the safe choice


def test_padding_free_is_the_gpu_default_and_packing_only_when_asked_and_sft_only(tmp_path, tiny_model_dir):
    """Padding-free keeps the batches (the same rows per step); packing changes them, so it is never automatic."""
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir()), ["train.gradient_checkpointing=false"])

    def decided(r):
        s = train_module._decide_speed(r, GPU, "flash_attention_2", False, None, 64)
        return s.padding_free, s.packing

    assert decided(recipe) == (True, False)
    assert decided(recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": True})})) == (True, True)
    dpo = recipe.model_copy(update={"train": recipe.train.model_copy(update={"method": "dpo"})})
    assert decided(dpo) == (False, False), "the preference and RL trainers batch their own pairs and groups"
    assert train_module._decide_speed(recipe, CPU, "sdpa", False, None, 64).padding_free is False


def test_an_older_recipe_with_packing_auto_still_loads_and_packs_only_when_its_run_did(tmp_path, tiny_model_dir):
    """Run directories keep their resolved recipe, `packing: auto` included (the default until issue #19): eval,
    merge and continuing runs must still read it, and a resumed run that packed keeps its batches."""
    from finetune.speed import decide_packing

    old = load_recipe(
        write_recipe(tmp_path, tiny_model_dir()), ["data.packing=auto", "train.gradient_checkpointing=false"]
    )
    assert old.data.packing == "auto"
    assert decide_packing("auto", None) is False and decide_packing("auto", True) is True
    assert decide_packing(False, True) is False, "a setting the recipe names is kept as written"
    decided = train_module._decide_speed(old, GPU, "flash_attention_2", False, None, 64, {"packing": True})
    assert (decided.packing, decided.padding_free) == (True, True)
    assert train_module._decide_speed(old, GPU, "flash_attention_2", False, None, 64).packing is False


def test_liger_asked_for_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(UserError, match="liger_kernel: true needs a CUDA GPU"):
        decide_liger(True, CPU)


def test_plan_counts_checkpointing_in_where_auto_would_turn_it_on(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir()), ["train.gradient_checkpointing=auto"])
    memory = plan(recipe).memory
    assert memory.gradient_checkpointing == "auto"
    assert memory.activations_with_checkpointing < memory.activations_without_checkpointing
    assert memory.total == memory.lower_bound + memory.activations_without_checkpointing


@pytest.mark.slow
def test_on_a_gpu_train_prepares_hub_data_once_and_estimates_its_peak(tmp_path, tiny_model_dir, monkeypatch):
    """Checkpointing `auto` on a (simulated) 80 GB GPU: one data preparation, one peak estimate from the
    sequence length train settled on, although the data is a hub dataset and max_seq_length is `auto`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--reverse"
    tiny.write_jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", tiny.reverse_rows(24))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = write_recipe(tmp_path, tiny_model_dir())
    path.write_text(path.read_text().replace("{path: data/train.jsonl}", "{path: acme/reverse}"))
    sets = ["train.gradient_checkpointing=auto", "data.max_seq_length=auto", "train.max_steps=1",
            "eval.metrics=[loss]", "eval.compare_base=false"]  # fmt: skip
    recipe = load_recipe(path, sets)

    monkeypatch.setattr(train_module, "this_machine", lambda: dataclasses.replace(this_machine(), gpu_bytes=80 * 10**9))
    preparations, peaks = [], []
    real_key, real_peak = prepare_module.cache_key, plan_module.peak_memory
    monkeypatch.setattr(prepare_module, "cache_key", lambda *a: preparations.append(1) or real_key(*a))
    monkeypatch.setattr(plan_module, "peak_memory", lambda *a: peaks.append(real_peak(*a)) or peaks[-1])
    monkeypatch.chdir(tmp_path)
    train_module.train(recipe, progress=False)

    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert len(preparations) == 1, "train prepares (and hashes) its data once"
    assert len(peaks) == 1 and peaks[0] is not None and 0 < peaks[0] < 10**10, peaks
    assert manifest["speed"]["gradient_checkpointing"] is False, "a tiny model fits an 80 GB GPU without it"


def test_nonfinite_loss_or_grad_norm_is_noted_on_the_device_and_raised_at_the_next_log_naming_the_first_step():
    """The per-step check costs no host sync; the log (and any checkpoint) after it raises, naming the first one."""
    from types import SimpleNamespace

    import torch

    from finetune.methods.sft import FinetuneSFTTrainer
    from finetune.trainer import NonFiniteError

    trainer = FinetuneSFTTrainer.__new__(FinetuneSFTTrainer)  # only the check's state, no model
    trainer.state = SimpleNamespace(global_step=0)
    for step, loss, norm in [(0, 1.5, 2.0), (1, 1.2, 0.5)]:
        trainer.state.global_step = step
        trainer._watch(0, torch.tensor(loss))
        trainer._watch(1, torch.tensor(norm))
    trainer._stop_if_nonfinite()  # all finite: nothing raised
    trainer.state.global_step = 4
    trainer._watch(1, torch.tensor(float("inf")))  # the gradient norm first, at step 5
    trainer.state.global_step = 5
    trainer._watch(0, torch.tensor(float("nan")))
    trainer._watch(1, torch.tensor(float("nan")))  # later ones do not overwrite the first
    with pytest.raises(NonFiniteError, match=r"^gradient norm is inf at step 5$"):
        trainer._stop_if_nonfinite()
    with pytest.raises(NonFiniteError, match="at step 5"):
        trainer.log({"loss": float("nan")})  # the log that would record it raises first
