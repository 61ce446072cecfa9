"""`finetune merge`: verified merges (LoRA, DoRA, NF4-trained QLoRA; llama and tied-embedding gemma),
atomicity, the tolerance gate, and combining adapters (ties, linear, cat math, mismatches)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
import torch
from merge_runs import RUNS, Runs, leftovers
from typer.testing import CliRunner

import finetune.merge as merge_stage
from finetune.cli import app
from finetune.combine import combine
from finetune.errors import UserError
from finetune.merge import merge
from finetune.recipe.load import load_recipe

pytestmark = pytest.mark.slow

MERGED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "merge_check.json",
}
MATRIX = [name for name in RUNS if name != "llama-rank12"]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 31]])
runner = CliRunner()


@pytest.fixture
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory, tiny_model_dir)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("name", MATRIX)
def test_merged_model_equals_base_plus_adapter(name, runs, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs[name]
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    loads = []

    def load_model(recipe, attention, quantized=True):
        loads.append(quantized)
        return real_load_model(recipe, attention, quantized=quantized)

    real_load_model = merge_stage.load_model
    monkeypatch.setattr(merge_stage, "load_model", load_model)
    result = merge(run)
    assert loads == [False], "the base is never loaded quantized for a merge"
    merged_dir = run / "merged"
    assert result.out_dir == str(merged_dir)
    assert {p.name for p in merged_dir.iterdir()} == MERGED_FILES
    assert leftovers(run) == []

    # the stage's own check, as written next to the weights
    check = json.loads((merged_dir / "merge_check.json").read_text())
    assert check == result.check and check["passed"] and check["dtype"] == "float32"
    assert check["max_abs_diff"] <= 1e-5, check
    assert check["adapter_effect"] > 1e-2, "the adapter must move the logits, or the check proves nothing"
    assert check["prompts_from"].endswith("examples.jsonl") == RUNS[name][2]

    # and independently: plain transformers on the merged directory vs PEFT on the base
    base = AutoModelForCausalLM.from_pretrained(recipe.model.base, dtype=torch.float32)
    expected = logits_of(PeftModel.from_pretrained(base, run / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert (logits_of(merged) - expected).abs().max() <= 1e-5
    assert getattr(merged.config, "quantization_config", None) is None

    if name.startswith("gemma"):
        trains_head = "lm_head" in name
        assert merged.config.tie_word_embeddings is not trains_head, "a trained lm_head must be saved untied"
        assert any("tie_word_embeddings: false" in n for n in result.notes) is trains_head
    if name.endswith("nf4"):
        assert any("never into 4-bit" in n for n in result.notes), result.notes
    eos = merged.generation_config.eos_token_id
    end_of_turn = AutoTokenizer.from_pretrained(merged_dir).convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in (eos if isinstance(eos, list) else [eos]), "generation must stop at the end of a turn"


def test_merged_directory_chats_like_base_plus_adapter_in_a_fresh_process(runs):
    """Plain transformers, its own generation config and chat template, greedy: same text as base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.generation import generate

    conversations = [[{"role": "user", "content": f"Reverse: {' '.join(tiny.WORDS[i : i + 3])}"}] for i in (0, 5, 9)]
    expected = {}
    for name in ("llama-lora", "gemma-lora-lm_head"):
        run = runs[name]
        if not (run / "merged").exists():
            merge(run)
        tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        recipe = load_recipe(run / "recipe.yaml", check_files=False)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.base), run / "adapter")
        expected[name] = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    script = textwrap.dedent("""
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        conversations, dirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        out = {}
        for name, path in dirs.items():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            texts = []
            for c in conversations:
                prompt = tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                new = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
            out[name] = texts
        print(json.dumps(out))
    """)
    dirs = {name: str(runs[name] / "merged") for name in expected}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(conversations), json.dumps(dirs)],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == expected


@pytest.mark.parametrize("where", ["saving the tokenizer", "verifying"])
def test_an_interrupted_merge_leaves_nothing_that_looks_complete(where, runs, tmp_path, monkeypatch):
    run = runs["llama-lora"]
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier merge, kept until a new one is complete")
    if where == "saving the tokenizer":  # the weights are written, then the disk fills up

        def fail(*args, **kwargs):
            raise OSError("No space left on device")

        monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", fail)
        expected: type[BaseException] = OSError
    else:  # Ctrl-C while the saved model is reloaded and compared

        def fail(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr("finetune.merge._verify", fail)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        merge(run, out=out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert leftovers(tmp_path) == []


def test_a_merge_above_tolerance_exits_1_and_writes_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(merge_stage.TOLERANCES, "float32", (0.0, -1.0))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(runs["llama-lora"]), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "merge check failed" in result.stderr and "nothing was written" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_merge_prints_the_check_and_refuses_to_overwrite(runs, tmp_path):
    out = tmp_path / "m"
    result = runner.invoke(app, ["merge", str(runs["llama-nf4"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "check: 4 prompts" in result.stdout and "passed" in result.stdout  # the fixed conversations
    assert "never into 4-bit" in result.stdout
    again = runner.invoke(app, ["merge", str(runs["llama-nf4"]), "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.stderr


def test_half_precision_merge_passes_its_documented_bound(runs, tmp_path):
    result = merge(runs["llama-dora"], out=tmp_path / "bf16", dtype="bfloat16")
    check = result.check
    assert check["dtype"] == "bfloat16" and check["passed"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert check["max_rel_diff"] < 0.02, check  # measured ~4.5e-3 on these models; bound is 0.1
    assert check["tolerance"] < check["adapter_effect"]
    with pytest.raises(UserError, match="never 4-bit"):
        merge(runs["llama-dora"], out=tmp_path / "nf4", dtype="nf4")


# --- combining adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_combined_adapter_is_a_run_that_merges(method, runs, tmp_path):
    parents = [runs["llama-lora"], runs["llama-nf4"]]
    out = tmp_path / f"both-{method}"
    result = combine(parents, method, [0.5, 0.5], None, out)
    assert result.rank == 8 and result.density == (0.5 if method == "ties" else None)
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "combined" and manifest["status"] == "completed"
    assert [p["run_dir"] for p in manifest["parents"]] == [str(p) for p in parents]
    assert manifest["combination"]["method"] == method
    recipe = load_recipe(out / "recipe.yaml", check_files=False)
    assert recipe.name == out.name and recipe.lora.rank == 8 and recipe.lora.alpha == 8
    assert recipe.model.base == load_recipe(parents[0] / "recipe.yaml", check_files=False).model.base
    if method == "ties":  # usable like a run: merged into the base, and exported with a card naming its parents
        merged = merge(out)
        assert merged.check["passed"] and merged.check["max_abs_diff"] <= 1e-5
        from finetune.export import export

        card = (Path(export(out, "adapter").out_dir) / "README.md").read_text()
        assert "## Combination" in card and "method `ties`, density 0.5" in card
        assert card.count("| llama-") == 2, card


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    t = load_file(adapter / "adapter_model.safetensors")
    return {k: scale * t[k.replace("lora_A", "lora_B")].float() @ t[k].float() for k in t if ".lora_A." in k}


def test_cat_combination_is_exactly_the_weighted_sum_of_updates(runs, tmp_path):
    """Also across scaling rules: PEFT gives the combined adapter its first parent's rsLoRA flag, which
    would scale it by sqrt(r) instead of 1; the combined adapter must be plain LoRA with scaling 1."""
    a, b = runs["llama-rslora"], runs["llama-nf4"]  # alpha/sqrt(r) and alpha/r; bfloat16 QLoRA weights
    combine([a, b], "cat", [0.3, 0.7], None, tmp_path / "cat")
    config = json.loads((tmp_path / "cat" / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 16
    da, db, dc = _deltas(a / "adapter"), _deltas(b / "adapter"), _deltas(tmp_path / "cat" / "adapter")
    assert dc.keys() == da.keys()
    for key in dc:
        assert torch.allclose(dc[key], 0.3 * da[key] + 0.7 * db[key], atol=1e-7), key


def _copy_with_config(run: Path, dest: Path, **changes) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    config_path = dest / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return dest


def test_combining_refuses_mismatched_adapters(runs, tmp_path):
    lora = runs["llama-lora"]
    with pytest.raises(UserError, match="base model differs") as e:
        combine([lora, runs["gemma-nf4"]], "ties", None, None, tmp_path / "x")
    assert str(runs["gemma-nf4"]) in str(e.value)
    narrow = _copy_with_config(lora, tmp_path / "narrow", target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError, match=r"target modules differ: .* adapts \['q_proj', 'v_proj'\]"):
        combine([lora, narrow], "linear", None, None, tmp_path / "x")
    wide = _copy_with_config(lora, tmp_path / "wide", r=16)
    with pytest.raises(UserError, match="--method linear needs equal ranks"):
        combine([lora, wide], "linear", None, None, tmp_path / "x")
    with pytest.raises(UserError, match="DoRA adapter"):
        combine([lora, runs["llama-dora"]], "cat", None, None, tmp_path / "x")
    with pytest.raises(UserError, match="--weights: 3 weight"):
        combine([lora, runs["llama-nf4"]], "cat", [1, 1, 1], None, tmp_path / "x")
    with pytest.raises(UserError, match="--density: only applies"):
        combine([lora, runs["llama-nf4"]], "linear", None, 0.3, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["merge", str(lora), str(runs["gemma-nf4"]), "--method", "ties", "--out", "x"])
    assert result.exit_code == 2 and "base model differs" in result.stderr, result.output
    result = runner.invoke(app, ["merge", str(lora), str(runs["llama-nf4"])])
    assert result.exit_code == 2 and "--method" in result.stderr
