"""`finetune export`: the files of each format, the model card, the compatibility report worked out from
the adapter itself, and refusing a damaged adapter. Runs are shared with test_merge (trained once per session)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from merge_runs import Runs, leftovers
from preference_runs import dpo, parent  # noqa: F401  (a DPO run continuing an SFT run: fixtures)
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UserError
from finetune.export import export
from finetune.merge import merge
from finetune.recipe.load import load_recipe

ADAPTER_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.yaml",
    "compat.json",
}
runner = CliRunner()


@pytest.fixture
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory, tiny_model_dir)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.slow
def test_adapter_export_has_the_adapter_card_recipe_and_report(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["llama-lora"]
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    result = export(run, "adapter", tmp_path / "out")
    out = Path(result.out_dir)
    assert set(result.files) == ADAPTER_FILES and leftovers(tmp_path) == []
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == recipe.model.base
    assert {"lora", "peft"} <= set(meta["tags"])
    manifest = json.loads((run / "manifest.json").read_text())
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert f"| steps | {manifest['steps']} |" in card
    assert f"{manifest['lora']['trainable_params']:,} of {manifest['lora']['total_params']:,}" in card
    assert f"| loss | {summary['base']['loss']:.4g} | {summary['tuned']['loss']:.4g} |" in card
    assert "| train.jsonl | messages | 32 |" in card
    assert "## Compatibility" in card and "--max-lora-rank 8" in card
    assert load_recipe(out / "recipe.yaml", check_files=False) == recipe
    assert json.loads((out / "compat.json").read_text()) == result.compat
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.base), out)  # a standard adapter


@pytest.mark.slow
def test_merged_export_is_the_verified_merged_model_with_its_card(runs, tmp_path):
    result = runner.invoke(app, ["export", str(runs["gemma-lora-lm_head"]), "--format", "merged", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    out = Path(r["out_dir"])
    assert out == runs["gemma-lora-lm_head"] / "export" / "merged"
    assert {"model.safetensors", "config.json", "merge_check.json", "README.md", "compat.json", "recipe.yaml"} <= set(
        r["files"]
    )
    assert r["merge_check"]["passed"] and r["merge_check"]["max_abs_diff"] <= 1e-5
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["base_model"] == r["compat"]["adapter"]["base_model"]
    assert "## Merge check" in (out / "README.md").read_text()
    vllm, plain = r["compat"]["targets"]["vllm"], r["compat"]["targets"]["transformers"]
    assert vllm["works"] is None and vllm["command"] == "vllm serve <this directory>"  # vLLM was not run
    assert plain["works"] is True and "the merge check reloaded this directory" in plain["checked"]
    again = runner.invoke(app, ["export", str(runs["gemma-lora-lm_head"]), "--format", "merged"])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "works", "max_lora_rank", "phrase"),
    [
        ("llama-lora", None, 8, "nothing in the adapter's files rules it out (--enable-lora --max-lora-rank 8)"),
        ("llama-rank12", None, 16, "rank 12 is not one of vLLM's sizes"),
        ("llama-dora", False, None, "DoRA is not served by vLLM"),
        ("gemma-lora-lm_head", False, None, "modules_to_save (lm_head) is not served by vLLM"),
    ],
)
def test_vllm_compatibility_is_read_from_the_adapter(name, works, max_lora_rank, phrase, runs, tmp_path):
    result = runner.invoke(app, ["export", str(runs[name]), "--format", "adapter", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert phrase in result.stdout
    compat = json.loads((tmp_path / "x" / "compat.json").read_text())
    vllm = compat["targets"]["vllm"]
    assert vllm["works"] is works and vllm["max_lora_rank"] == max_lora_rank
    assert phrase in " ".join([vllm["summary"], *vllm["reasons"]])
    if max_lora_rank:
        assert f"--max-lora-rank {max_lora_rank} " in vllm["command"]
    card = (tmp_path / "x" / "README.md").read_text()
    assert f"**vLLM**: {'not checked' if works is None else 'does not work'}" in card and phrase in card
    assert compat["targets"]["transformers_peft"]["works"] is None  # export --format adapter loads no model
    gguf = compat["targets"]["gguf"]  # no llama.cpp converter on the test machines
    assert gguf["works"] is None and gguf["summary"].startswith("no llama.cpp converter was run")
    assert "no llama.cpp converter was run" in result.stdout


@pytest.mark.slow
def test_gguf_verdicts_when_a_converter_is_installed(runs, monkeypatch, tmp_path):
    from finetune.export import compatibility
    from finetune.runs import open_run

    monkeypatch.setattr(
        "finetune.export.gguf_converter", lambda script: {"script": f"/opt/llama.cpp/{script}", "gguf_package": "0.17"}
    )
    plain = compatibility(open_run(runs["llama-lora"]), "adapter")["targets"]["gguf"]
    assert plain["works"] is None and plain["command"].startswith("python convert_lora_to_gguf.py --base ")
    dora = compatibility(open_run(runs["llama-dora"]), "adapter")["targets"]["gguf"]
    assert dora["works"] is False and any("magnitude vectors" in r for r in dora["reasons"])
    head = compatibility(open_run(runs["gemma-lora-lm_head"]), "adapter")["targets"]["gguf"]
    assert head["works"] is False and any("base_model.model.lm_head.weight" in r for r in head["reasons"])


def _run_without_training(tmp_path: Path, model_dir: Path, **config) -> Any:
    """A Run as open_run returns it, with a hand-written adapter config and tensor shapes (nothing trained)."""
    from finetune.runs import Run

    (tmp_path / "recipe.yaml").write_text(
        f"name: r\nmodel: {{base: {model_dir}}}\nlora: {{rank: 8, alpha: 16}}\n"
        "data: {train: [{path: train.jsonl}]}\n"
    )
    recipe = load_recipe(tmp_path / "recipe.yaml", check_files=False)
    tensors = {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{m}.weight": s for m, s in (("A", [8, 64]),
               ("B", [64, 8]))}  # fmt: skip
    adapter_config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **config}
    return Run(tmp_path, recipe, {}, adapter_config, tensors)


def test_works_is_said_only_of_what_a_check_ran_on_the_export(tmp_path, tiny_model_dir, monkeypatch):
    from finetune.export import compatibility

    monkeypatch.setattr(  # a converter installed is not a converter run: GGUF stays "not checked"
        "finetune.export.gguf_converter", lambda script: {"script": f"/opt/llama.cpp/{script}", "gguf_package": "0.17"}
    )
    run = _run_without_training(tmp_path, tiny_model_dir())
    adapter = compatibility(run, "adapter")["targets"]
    assert {k: v["works"] for k, v in adapter.items()} == {"transformers_peft": None, "vllm": None, "gguf": None}
    assert adapter["gguf"]["summary"] == "no llama.cpp converter was run"
    assert adapter["vllm"]["max_lora_rank"] == 8 and adapter["vllm"]["summary"].startswith("vLLM was not run")
    exported = tmp_path / "merged"
    exported.mkdir()
    unverified = compatibility(run, "merged", exported)["targets"]
    assert {k: v["works"] for k, v in unverified.items()} == {"transformers": None, "vllm": None, "gguf": None}
    (exported / "merge_check.json").write_text(json.dumps({"passed": True, "max_abs_diff": 2e-7, "tolerance": 1e-5}))
    merged = compatibility(run, "merged", exported)["targets"]
    assert merged["transformers"]["works"] is True and merged["transformers"]["reasons"][0].startswith("checked: ")
    assert merged["vllm"]["works"] is None and merged["gguf"]["works"] is None
    dora = compatibility(_run_without_training(tmp_path, tiny_model_dir(), use_dora=True), "adapter")["targets"]
    assert dora["vllm"]["works"] is False and "DoRA is not served by vLLM" in dora["vllm"]["reasons"][0]


def test_the_card_of_a_dpo_run_names_its_method_lineage_and_compares_with_the_parent(dpo, tmp_path):  # noqa: F811
    run, _, _ = dpo
    result = export(run, "adapter", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert "dpo" in meta["tags"] and "sft" not in meta["tags"]
    assert "trained with DPO by `finetune`" in card
    base = json.loads((run / "manifest.json").read_text())["base_model"]["id"]
    assert f"Lineage: `{base}` → `sft` → `dpo`." in card
    summary = json.loads((run / "eval" / "summary.json").read_text())
    tuned, parent_ = summary["tuned"]["metrics"], summary["reference"]["metrics"]
    assert "| metric | base | parent `sft` | tuned | vs parent | vs base |" in card
    accuracy = tuned["preference_accuracy"]
    line = next(x for x in card.splitlines() if x.startswith("| preference_accuracy |"))
    assert (
        f"| {parent_['preference_accuracy']:.4g} | {accuracy:.4g} | {accuracy - parent_['preference_accuracy']:+.4g} |"
        in line
    )
    assert not any("merged model" in note for note in result.notes)  # an adapter export has no merged model
    assert any("holds both updates" in note for note in result.notes)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _no_tensors(path: Path) -> None:
    header = b'{"__metadata__":{"format":"pt"}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "truncated safetensors file"),
        (_no_tensors, "the adapter holds no tensors"),
        (lambda p: p.write_bytes(b"not a safetensors file"), "unreadable or truncated safetensors file"),
        (lambda p: p.unlink(), "missing adapter weights"),
    ],
    ids=["truncated", "no-tensors", "garbage", "missing"],
)
def test_a_damaged_adapter_is_refused_naming_the_file(damage, message, runs, tmp_path):
    run = shutil.copytree(runs["llama-lora"], tmp_path / "run", ignore=shutil.ignore_patterns("merged", "export"))
    weights = run / "adapter" / "adapter_model.safetensors"
    damage(weights)
    with pytest.raises(UserError, match=message) as e:
        export(run, "adapter")
    assert str(weights) in str(e.value)
    with pytest.raises(UserError, match=message):
        merge(run)
    result = runner.invoke(app, ["export", str(run), "--format", "merged"])
    assert result.exit_code == 2 and f"error: {weights}: " in result.stderr, result.output
    assert not (run / "export").exists() and not (run / "merged").exists()


def test_bad_arguments_are_user_errors(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "onnx"])
    assert result.exit_code == 2 and "--format: must be one of adapter, merged, gguf" in result.stderr
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "adapter"])
    assert result.exit_code == 2 and "not a run directory (no recipe.yaml)" in result.stderr
    result = runner.invoke(app, ["merge", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run directory" in result.stderr
    result = runner.invoke(app, ["merge", str(tmp_path), str(tmp_path), "--method", "mean", "--out", "x"])
    assert result.exit_code == 2 and "--method: must be one of linear, ties" in result.stderr
    result = runner.invoke(app, ["merge", str(tmp_path), str(tmp_path), "--method", "cat", "--weights", "1,x"])
    assert result.exit_code == 2 and "--weights: expected numbers separated by commas" in result.stderr


def test_the_gguf_card_loads_the_first_exported_file(tmp_path, tiny_model_dir):
    from finetune.export import adapter_facts, model_card

    run = _run_without_training(tmp_path, tiny_model_dir())
    files = {"model": "model-q4_k_m.gguf", "base": "base-q4_k_m.gguf", "adapter": "adapter-f32.gguf"}
    card = model_card(run, "gguf", {"adapter": adapter_facts(run), "files": files, "targets": {}}, None)
    assert 'Llama("<this directory>/model-q4_k_m.gguf")' in card
    assert 'Llama("<this directory>/base-q4_k_m.gguf", lora_path="<this directory>/adapter-f32.gguf")' in card
    assert "f16" not in card.split("## Use")[1].split("```")[1]
