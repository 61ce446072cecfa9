"""The `auto` speed settings: what they decide on this machine, and on a GPU of a given size."""

from __future__ import annotations

import pytest
from test_train import write_recipe

from finetune.errors import UserError
from finetune.loading import load_recipe
from finetune.plan import plan
from finetune.speed import checkpointing, decide, liger


def recipe_for(tmp_path, model_dir, *sets: str):
    path = write_recipe(tmp_path, model_dir)
    return load_recipe(path, ["train.gradient_checkpointing=auto", *sets])


def test_on_the_cpu_auto_means_sdpa_no_packing_no_checkpointing_no_liger(tmp_path, tiny_model_dir):
    speed = decide(recipe_for(tmp_path, tiny_model_dir()))
    assert speed.to_dict() == {
        "attn_implementation": "sdpa",
        "packing": False,
        "gradient_checkpointing": False,
        "liger_kernel": False,
    }


def test_explicit_settings_are_kept_as_written(tmp_path, tiny_model_dir):
    sets = ["model.attn_implementation=eager", "data.packing=true", "train.gradient_checkpointing=true"]
    speed = decide(recipe_for(tmp_path, tiny_model_dir(), *sets))
    assert (speed.attn_implementation, speed.packing, speed.gradient_checkpointing) == ("eager", True, True)


def test_checkpointing_turns_on_only_where_the_plan_does_not_fit(tmp_path, tiny_model_dir):
    recipe = recipe_for(tmp_path, tiny_model_dir())
    need = plan(recipe).memory.total  # without checkpointing, as `auto` plans it
    assert checkpointing(recipe, gpu_bytes=2 * need) is False
    assert checkpointing(recipe, gpu_bytes=need) is True  # over 90% of the GPU
    assert checkpointing(load_recipe(write_recipe(tmp_path, tiny_model_dir()), []), gpu_bytes=1) is False  # as set


def test_liger_asked_for_where_it_cannot_run_is_a_clear_error(tmp_path, tiny_model_dir):
    recipe = recipe_for(tmp_path, tiny_model_dir(), "train.liger_kernel=true")
    with pytest.raises(UserError, match="liger_kernel: true needs a CUDA GPU"):
        liger(recipe)


def test_plan_counts_checkpointing_in_where_auto_would_turn_it_on(tmp_path, tiny_model_dir):
    memory = plan(recipe_for(tmp_path, tiny_model_dir())).memory
    assert memory.gradient_checkpointing == "auto"
    assert memory.activations_with_checkpointing < memory.activations_without_checkpointing
    assert memory.total == memory.lower_bound + memory.activations_without_checkpointing


def test_nonfinite_loss_or_grad_norm_is_noted_on_the_device_and_raised_at_the_next_log_naming_the_first_step():
    """The per-step check costs no host sync; the log (and any checkpoint) after it raises, naming the first one."""
    from types import SimpleNamespace

    import torch

    from finetune.trainer import FinetuneTrainer, NonFiniteError

    trainer = FinetuneTrainer.__new__(FinetuneTrainer)  # only the check's state, no model
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
