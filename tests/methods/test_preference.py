"""Preference training after SFT (DPO, KTO): a correctly wired reference, lineage, data rows and masks,
resume and merge of a preference run. The shipped example end to end is scripts/check_quickstart_dpo.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from preference_runs import dpo, dpo_recipe, pairs, parent, write  # noqa: F401  (pytest fixtures)

from finetune.errors import DataError, RecipeError
from finetune.files import file_sha256
from finetune.lineage import ParentRunError, continue_parent
from finetune.recipe.load import load_recipe


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


# --- the reference is the SFT adapter, and only the policy moves --------------------------------


def test_first_step_is_ln2_with_zero_rewards_then_only_the_policy_moves(dpo, parent):  # noqa: F811
    from safetensors.torch import load_file

    run, model, _ = dpo
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4), "policy == reference at step 1"
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    later = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[1:]]
    assert any(r.get("rewards/margins", 0) > 0 for r in later), "the adapter must be trainable"

    sft = load_file(parent / "adapter" / "adapter_model.safetensors")
    state = {n: p.detach() for n, p in model.named_parameters()}
    moved = reference = 0
    for key, value in sft.items():  # base_model.model...lora_A.weight
        ref = state[key.replace(".lora_A.weight", ".lora_A.ref.weight").replace(".lora_B.weight", ".lora_B.ref.weight")]
        policy = state[
            key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        ]
        assert torch.equal(ref, value), f"reference adapter changed: {key}"
        reference += 1
        moved += not torch.equal(policy, value)
    assert reference == len(sft) and moved == len(sft), (moved, len(sft))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == sft.keys(), "the run's adapter is the continued one, without the reference copy"


def test_held_out_table_has_reference_at_chance_and_tuned_ahead(dpo):  # noqa: F811
    run, _, _ = dpo
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["pairs"] == 8
    assert summary["reference"]["metrics"]["preference_accuracy"] == 0.5  # rewards 0 vs itself: ties count half
    assert summary["reference"]["metrics"]["reward_margin"] == 0.0
    # our held-out figures for the tuned model agree with TRL's own evaluation at the last step
    trl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
    tuned = summary["tuned"]["metrics"]
    assert tuned["preference_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-6)
    assert tuned["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], abs=1e-4)
    assert summary["tuned"]["logps"]["chosen"] == pytest.approx(trl["eval_logps/chosen"], abs=1e-3)
    assert tuned["reward_margin"] != 0.0
    for name in ("tuned", "reference", "base"):
        assert set(summary[name]["logps"]) == {"chosen", "rejected"} and "exact_match" in summary[name]["metrics"]


def test_eval_limit_cuts_the_pairs_too_so_every_figure_is_on_the_first_n(dpo, tmp_path):  # noqa: F811
    from finetune.evaluate import evaluate

    run, _, _ = dpo
    limited = evaluate(run, limit=3, out=tmp_path / "first-3").summary
    assert (limited.preference.pairs, limited.examples) == (3, 3)  # was (8, 3): the pairs ignored --limit
    assert limited.tuned.metrics["preference_accuracy"] * 6 == round(limited.tuned.metrics["preference_accuracy"] * 6)
    rows = (tmp_path / "first-3" / "examples.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads((tmp_path / "first-3" / "summary.json").read_text())["pairs"] == 3


# --- lineage -----------------------------------------------------------------------------------


def test_manifest_and_runs_show_give_the_lineage(dpo, parent):  # noqa: F811
    run, _, root = dpo
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["parent"]["path"] == str(parent) and manifest["parent"]["name"] == "sft"
    assert manifest["parent"]["manifest_sha256"] == file_sha256(parent / "manifest.json")
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    parent_recipe = load_recipe(parent / "recipe.yaml", check_files=False)
    assert recipe.model.base == parent_recipe.model.base and recipe.lora == parent_recipe.lora
    shown = finetune("runs", "show", str(run), cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert f"lineage: {parent_recipe.model.base} → sft ({parent}) → dpo" in shown.stdout


def test_lora_disagreeing_with_the_continued_adapter_names_both_values(tmp_path, parent):  # noqa: F811
    recipe = load_recipe(dpo_recipe(tmp_path, parent, extra="lora: {rank: 4, alpha: 16}\n"))
    with pytest.raises(ParentRunError) as e:
        continue_parent(recipe)
    assert "lora.rank: 4 here" in str(e.value) and "has 8" in str(e.value)
    assert "lora.alpha" not in str(e.value), "an agreeing value is no error"


def test_a_parent_that_is_missing_or_not_completed_exits_2(tmp_path, parent):  # noqa: F811
    missing = finetune("train", str(dpo_recipe(tmp_path, tmp_path / "runs" / "nothing")), cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr
    assert "not a run directory" in missing.stderr and "Traceback" not in missing.stderr
    copy = tmp_path / "unfinished"
    shutil.copytree(parent, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    with pytest.raises(ParentRunError, match="status is 'interrupted', not 'completed'"):
        continue_parent(load_recipe(dpo_recipe(tmp_path, copy)))


def test_method_options_belong_to_their_method(tmp_path, parent):  # noqa: F811
    with pytest.raises(RecipeError, match=r"train.dpo.desirable_weight: is an option of method kto"):
        load_recipe(dpo_recipe(tmp_path, parent), ["train.dpo.desirable_weight=2.0"])
    with pytest.raises(RecipeError, match=r"train.kto: options of method kto, but train.method is dpo"):
        load_recipe(dpo_recipe(tmp_path, parent), ["train.kto.beta=0.2"])
    with pytest.raises(RecipeError, match=r"loss_weights: has 1 weights for 2 loss types"):
        load_recipe(
            dpo_recipe(tmp_path, parent), ["train.dpo.loss_type=[sigmoid, sft]", "train.dpo.loss_weights=[1.0]"]
        )
    with pytest.raises(RecipeError, match=r"data.packing: applies to sft only, not train.method dpo"):
        load_recipe(dpo_recipe(tmp_path, parent), ["data.packing=true"])
    assert load_recipe(dpo_recipe(tmp_path, parent), ["data.packing=auto"]).data.packing == "auto"  # an older run's


# --- data: rows and masks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Reverse: a b", "chosen": "b a"}, "missing field 'rejected'"),
        ({"prompt": "Reverse: a b", "chosen": "  ", "rejected": "a b"}, "field 'chosen' is empty"),
        ({"prompt": "Reverse: a b", "chosen": "b a", "rejected": "b a"}, "chosen and rejected are identical"),
        ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}],
          "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "a"}]},
         "must share every turn but their last"),
        ({"chosen": "b a", "rejected": "a b"}, "missing field 'prompt'"),
    ],
)  # fmt: skip
def test_a_broken_preference_row_names_file_and_row(tmp_path, row, message):
    from finetune.data.preference import PreferenceStats, load_judged
    from finetune.recipe.schema import DataSource

    good = pairs(2)
    path = tiny.write_jsonl(tmp_path / "pairs.jsonl", [*good, row])
    with pytest.raises(DataError) as e:
        load_judged([DataSource(path=str(path), format="preference")], "error", PreferenceStats())
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)


def test_held_out_pairs_carry_their_slice_and_a_pair_without_one_is_named(tmp_path):
    """DPO's held-out pairs are sliced as SFT rows are: a source's `slice:` wins over the `eval.slice_by` column;
    a held-out pair without the column is a located error, before anything loads."""
    from finetune.data.preference import PreferenceStats, _split

    held = [{**p, "level": level} for p, level in zip(pairs(3, seed=1), ["a", "b", None], strict=True)]
    tiny.write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(6))
    tiny.write_jsonl(tmp_path / "data" / "held.jsonl", [{k: v for k, v in p.items() if v is not None} for p in held])
    tiny.write_jsonl(tmp_path / "data" / "named.jsonl", pairs(2, seed=2))

    def recipe(named: str = "") -> Any:
        path = write(tmp_path, "dpo", f"""\
name: dpo
model: {{base: acme/tiny}}
data:
  train: [{{path: data/pairs.jsonl, format: preference}}]
  eval: [{{path: data/held.jsonl, format: preference}}{named}]
train: {{method: dpo}}
eval: {{slice_by: level}}
""")  # fmt: skip
        return load_recipe(path, check_files=False)  # the data files are read; no model is needed

    with pytest.raises(DataError) as e:
        _split(recipe(), PreferenceStats())
    assert [p.where.rpartition("/")[2] for p in e.value.problems] == ["held.jsonl:3"], str(e.value)
    tiny.write_jsonl(tmp_path / "data" / "held.jsonl", [{**p, "level": p["level"] or "c"} for p in held])
    source = ", {path: data/named.jsonl, format: preference, slice: named}"
    _, held_out = _split(recipe(source), PreferenceStats())
    assert [[side.slice for side in group] for group in held_out] == [["a", "a"], ["b", "b"], ["c", "c"],
                                                                      ["named", "named"], ["named", "named"]]  # fmt: skip
    assert held_out[0][0].as_sample().slice == "a"  # the prompts the generation metrics answer are sliced too


def test_conversation_pairs_share_their_prompt_turns(tmp_path):
    from finetune.data.preference import PreferenceStats, load_judged
    from finetune.recipe.schema import DataSource

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"}]
    row = {"chosen": [*turns, {"role": "assistant", "content": "b a"}],
           "rejected": [*turns, {"role": "assistant", "content": "a b"}]}  # fmt: skip
    path = tiny.write_jsonl(tmp_path / "pairs.jsonl", [row])
    [[chosen, rejected]] = load_judged([DataSource(path=str(path), format="preference")], "error", PreferenceStats())
    assert chosen.prompt == rejected.prompt == (("system", "Be brief."), ("user", "Reverse: a b"))
    assert (chosen.completion, chosen.desirable, rejected.completion, rejected.desirable) == ("b a", True, "a b", False)


@pytest.mark.parametrize(
    ("template", "prompt_text", "end"),
    [
        ("chatml", "<|im_start|>user\nReverse: alpha beta<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"),
        ("llama3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nReverse: alpha beta<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ],
)  # fmt: skip
def test_only_the_answers_are_scored_token_by_token(tiny_tokenizer_dir, template, prompt_text, end):
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from finetune.data.formats import Judged
    from finetune.data.preference import _encode
    from finetune.data.templates import apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    apply_chat_template(tokenizer, template)
    prompt = (("user", "Reverse: alpha beta"),)
    chosen = _encode(tokenizer, Judged("f:1", prompt, "beta alpha", True))
    rejected = _encode(tokenizer, Judged("f:1", prompt, "alpha beta gamma", False))
    assert chosen[0] == rejected[0]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": chosen[0], "chosen_ids": chosen[1], "rejected_ids": rejected[1]}]
    )
    for row, answer in zip(range(2), ("beta alpha", "alpha beta gamma"), strict=True):
        ids, mask, attention = batch["input_ids"][row], batch["completion_mask"][row], batch["attention_mask"][row]
        scored = [int(t) for t, m, a in zip(ids, mask, attention, strict=True) if m and a]
        unscored = [int(t) for t, m, a in zip(ids, mask, attention, strict=True) if not m and a]
        assert tokenizer.decode(unscored) == prompt_text
        assert tokenizer.decode(scored) == answer + end
        scored_positions = [i for i, m in enumerate(mask.tolist()) if m]
        assert scored_positions == list(range(len(chosen[0]), len(chosen[0]) + len(scored))), "one contiguous run"


# --- resume, merge, KTO ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_to_the_same_adapter(dpo, parent, tmp_path):  # noqa: F811
    from safetensors.torch import load_file
    from training import start, wait_for_step

    run, _, _ = dpo
    recipe = dpo_recipe(tmp_path, parent)
    killed = tmp_path / "runs" / "dpo"
    proc = start(recipe, tmp_path)
    wait_for_step(killed, 5, proc)
    proc.kill()
    proc.wait()
    resumed = finetune("train", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumes"][0]["from_step"] == 4
    expected, got = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, killed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key


@pytest.mark.slow
def test_merge_of_a_dpo_run_is_verified_and_holds_the_sft_update(dpo, parent):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.merge import merge

    run, _, _ = dpo
    result = merge(run)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-5, result.check
    base_dir = load_recipe(run / "recipe.yaml", check_files=False).model.base
    ids = torch.tensor([[5, 9, 14, 3, 7]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    merged = logits(AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32))
    dpo_model = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "adapter"))
    sft_model = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), parent / "adapter"))
    assert (merged - dpo_model).abs().max() <= 1e-5
    assert (merged - sft_model).abs().max() > 1e-3, "the DPO update is in the merged weights"


@pytest.mark.slow
def test_kto_from_the_base_model_on_unpaired_rows(tmp_path, tiny_model_dir):
    from finetune.train import train

    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs(24) for side in ("chosen", "rejected")]  # fmt: skip
    tiny.write_jsonl(tmp_path / "data" / "kto.jsonl", rows)
    recipe = write(tmp_path, "kto", f"""\
name: kto
model: {{base: {tiny_model_dir("llama")}}}
lora: {{rank: 8, alpha: 16}}
data: {{train: [{{path: data/kto.jsonl, format: unpaired}}], eval: {{split_ratio: 0.25}}, max_seq_length: 64}}
train: {{method: kto, max_steps: 4, lr: 5.0e-3, batch_size: 4, warmup_ratio: 0.0, logging_every: 1,
         gradient_checkpointing: false}}
eval: {{metrics: [exact_match], max_new_tokens: 4}}
output_dir: {tmp_path / "runs" / "kto"}
""")  # fmt: skip
    result = train(load_recipe(recipe), progress=False)
    logs = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["rewards/chosen"] == 0.0 and "kl" in logs[0], logs[0]  # fresh LoRA == base == reference
    summary = result.eval.to_dict()
    assert summary["method"] == "kto" and summary["reference_is_base"] and summary["base"] is not None
    assert (
        "parent" not in json.loads((Path(result.run_dir) / "manifest.json").read_text())
        or not json.loads((Path(result.run_dir) / "manifest.json").read_text())["parent"]
    )


def test_data_and_plan_count_pairs_sides_and_the_reference(tmp_path, parent):  # noqa: F811
    from finetune.data.inspect import inspect_data
    from finetune.plan import plan

    recipe = load_recipe(dpo_recipe(tmp_path, parent), ["data.max_seq_length=16"])
    shown = inspect_data(recipe, show=2).to_dict()
    s = shown["stats"]
    assert (s["paired"], s["train_rows"] + s["dropped"], s["eval_rows"]) == (True, 40, 8)
    assert set(s["lengths"]) == {"prompt", "chosen", "rejected"} and s["truncated"] > 0
    assert s["truncated_identical"] <= s["dropped"]
    example = shown["examples"][0]
    assert example["prompt"].endswith("<|im_start|>assistant\n") and example["chosen"] != example["rejected"]

    full = load_recipe(dpo_recipe(tmp_path, parent))
    sft_like = plan(full.model_copy(update={"train": full.train.model_copy(update={"method": "sft"})}))
    planned = plan(full).to_dict()
    assert planned["work"]["sequences_per_epoch"] == 2 * planned["work"]["train_rows"]
    memory = {t["name"]: t["bytes"] for t in planned["memory"]["terms"]}
    assert memory["reference adapter"] == memory["adapter weights"]
    assert memory["activations"] == 2 * {t.name: t.bytes for t in sft_like.memory.terms}["activations"]
    assert any("reference" in n for n in planned["notes"])
