"""`lora.init`, LoRA+ and new tokens end to end through the CLI, minutes of training: not in the main suite (tests/test_lora_init.py
holds the fast conversion checks). Run: python -m pytest -p no:cacheprovider scripts/lora_options_e2e.py

Per init: `finetune train`, then `finetune eval` (adapter/ loaded with plain PEFT on the base, as chat and serve
load it) must score what training scored in memory, and `finetune merge` must pass its logits check against
base + adapter on the ORIGINAL base (LoftQ: on the NF4 base dequantized, and the merged model must give the trained
NF4 model's logits). And a PiSSA run killed mid-way resumes to the uninterrupted adapter.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import tiny
from helpers import finetune, losses, write_recipe

INITS = [
    ("kaiming", []),
    ("gaussian", []),
    ("pissa", []),
    ("pissa", ["lora.init.svd_iters=2"]),
    ("olora", []),
    ("eva", ["lora.init.data_batches=2", "lora.init.eva_tau=0.9"]),
    ("corda", ["lora.init.data_batches=2"]),
    ("loftq", ["quantization.method=nf4"]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_model("llama", root / "model", tiny.build_tokenizer(root / "tokenizer"))


def _train(recipe, cwd, *sets):
    args = [a for s in sets for a in ((s,) if s.startswith("--") else ("--set", s))]
    result = finetune("train", str(recipe), *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize(("method", "extra"), INITS, ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_train_eval_and_merge_through_the_cli(method, extra, model_dir, tmp_path):
    """`finetune eval` loads adapter/ with plain PEFT on the base (as chat and serve do): it scores what training
    scored in memory; `finetune merge` verifies the merged model against base + adapter on the original base."""
    recipe = write_recipe(tmp_path, model_dir)
    _train(recipe, tmp_path, f"lora.init.method={method}", *extra)
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["lora_init"]["method"] == method and manifest["lora_init"]["seconds"] >= 0
    if method in ("eva", "corda"):
        assert manifest["lora_init"]["data"]["rows"] == 16  # 2 batches of 8
    in_training = json.loads((run / "eval" / "summary.json").read_text())["tuned"]
    again = finetune("eval", str(run), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    reloaded = json.loads((tmp_path / "again" / "summary.json").read_text())["tuned"]
    assert reloaded["loss"] == pytest.approx(in_training["loss"], abs=1e-4)
    merged = finetune("merge", str(run), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["passed"]
    if method == "loftq":  # into the NF4 weights dequantized: the model that was trained, not W + B A
        assert check["base_weights"] == "nf4 dequantized" and "LoftQ adapter" in merged.stdout + merged.stderr
        dequantized, original = _distances_from_the_trained_model(run)
        print(f"loftq merged: {dequantized:.3g} from the trained NF4 model; base + adapter on W: {original:.3g}")
        assert dequantized < 0.1 * original  # W + B A counts the quantization error twice: farther from it


def _distances_from_the_trained_model(run: Path) -> tuple[float, float]:
    """Max |logit difference| from the trained model (the NF4 base + adapter, as eval loads it) of the merged model,
    and of the adapter on the original weights W (what merging into W would give). The NF4 model computes in its
    compute dtype, so neither is zero."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.modeling import load_model
    from finetune.runs import open_run

    recipe = open_run(run).recipe

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = logits(PeftModel.from_pretrained(load_model(recipe, "eager"), str(run / "adapter")))
    merged = logits(AutoModelForCausalLM.from_pretrained(run / "merged", attn_implementation="eager"))
    on_w = logits(PeftModel.from_pretrained(load_model(recipe, "eager", quantized=False), str(run / "adapter")))
    return float((merged - trained).abs().max()), float((on_w - trained).abs().max())


@pytest.mark.slow
def test_a_killed_pissa_run_resumes_to_the_uninterrupted_adapter(model_dir, tmp_path):
    """The checkpoints hold the adapter on the residual base; the resumed run rebuilds that base (checked against
    lora-init/initial) and ends with the same converted adapter as a run never interrupted."""
    from training import adapter_tensors, start, wait_for_step

    recipe = write_recipe(tmp_path, model_dir)
    recipe.write_text(recipe.read_text().replace("max_steps: 8", "max_steps: 16\n  save_every: 4"))
    _train(recipe, tmp_path, "lora.init.method=pissa", "output_dir=runs/full")
    proc = start(recipe, tmp_path, "--set", "lora.init.method=pissa", "--set", "output_dir=runs/killed")
    run = tmp_path / "runs" / "killed"
    wait_for_step(run, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _train(recipe, tmp_path, "lora.init.method=pissa", "output_dir=runs/killed", "--resume")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumes"][0]["from_step"] in (4, 8)
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "full"), abs=1e-6)


LORAPLUS = "  loraplus_lr_ratio: 16\n  scheduler: constant\n  save_every: 4\n"


def loraplus_recipe(tmp_path, model_dir, steps: int):
    path = write_recipe(tmp_path, model_dir)
    text = path.read_text().replace("max_steps: 8", f"max_steps: {steps}")
    path.write_text(text.replace("train:\n", "train:\n" + LORAPLUS))
    return path


@pytest.mark.slow
def test_a_killed_loraplus_run_resumes_to_the_same_adapter(model_dir, tmp_path):
    from training import adapter_tensors, start, wait_for_step

    recipe = loraplus_recipe(tmp_path, model_dir, steps=12)
    full = finetune("train", str(recipe), "--set", "output_dir=runs/full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = start(recipe, tmp_path)
    run = tmp_path / "runs" / "tiny"
    wait_for_step(run, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = finetune("train", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "manifest.json").read_text())["resumes"][0]["from_step"] in (4, 8)
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name


# --- new tokens: ChatML on a base tokenizer that lacks its markers (data.add_special_tokens: auto) ---------------

NEW_TOKENS = ["data.chat_template=chatml", "data.add_special_tokens=auto"]


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """family -> a tiny model whose tokenizer has no ChatML tokens and no template (a base model's)."""
    root = tmp_path_factory.mktemp("base")
    tokenizer = tiny.build_tokenizer(root / "tokenizer", base=True)
    built = {}

    def get(family):
        if family not in built:
            built[family] = tiny.build_model(family, root / family, tokenizer)
        return built[family]

    return get


def _plain_peft_greedy(model_dir: Path, adapter: Path, prompt: str, new: int) -> str:
    """What a user of the adapter alone does (the model card's lines): grow the base, load with PEFT, generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids(
        "<|im_end|>"), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "mode"), [("llama", "trainable_rows"), ("llama", "modules_to_save"),
                                              ("gemma", "trainable_rows")])  # fmt: skip
def test_new_tokens_train_save_with_the_adapter_merge_and_load_with_plain_peft(family, mode, base_model_dir, tmp_path):
    """The adapter's tokenizer holds the new tokens; trainable_rows changes only their rows; `finetune merge`
    passes its logits check with the grown vocabulary; `finetune eval` (adapter/ reloaded) scores what training
    scored; plain PEFT on the grown base generates exactly what our eval generated."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model_dir = base_model_dir(family)
    recipe = write_recipe(tmp_path, model_dir)
    _train(recipe, tmp_path, *NEW_TOKENS, f"lora.new_tokens={mode}")
    run = tmp_path / "runs" / "tiny"
    base_size = len(AutoTokenizer.from_pretrained(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [base_size, base_size + 1]
    assert len(tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]) == 2
    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):
        assert len(AutoTokenizer.from_pretrained(checkpoint)) == base_size + 2
    new = json.loads((run / "manifest.json").read_text())["new_tokens"]
    assert new["tokens"] == ["<|im_start|>", "<|im_end|>"] and new["mode"] == mode and new["resized"]
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    full = [n for n in tensors if ".lora_" not in n]
    if mode == "trainable_rows":
        assert all(n.endswith("trainable_tokens_delta") for n in full) and all(tensors[n].shape[0] == 2 for n in full)
    else:
        assert any("embed_tokens" in n for n in full) and all(tensors[n].shape[0] == base_size + 2 for n in full)

    merged = finetune("merge", str(run), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads((run / "merged" / "merge_check.json").read_text())["passed"]
    assert json.loads((run / "merged" / "config.json").read_text())["vocab_size"] == base_size + 2
    if mode == "trainable_rows":  # only the new rows of the merged model differ from the base
        base_w, merged_w = load_file(model_dir / "model.safetensors"), load_file(run / "merged" / "model.safetensors")
        for name in [n for n in base_w if "embed_tokens" in n or "lm_head" in n]:
            assert torch.equal(merged_w[name][:base_size], base_w[name]), name
            assert not torch.equal(merged_w[name][base_size:], torch.zeros_like(merged_w[name][base_size:])), name

    exported = finetune("export", str(run), "--format", "adapter", cwd=tmp_path)  # the report and card: no model
    assert exported.returncode == 0, exported.stderr[-2000:]
    compat = json.loads((run / "export" / "adapter" / "compat.json").read_text())["targets"]
    assert compat["vllm"]["works"] is False and "added 2 tokens" in " ".join(compat["vllm"]["reasons"])
    card = (run / "export" / "adapter" / "README.md").read_text()
    assert "base.resize_token_embeddings(len(tokenizer), mean_resizing=False)" in card and "| new tokens |" in card

    in_training = json.loads((run / "eval" / "summary.json").read_text())["tuned"]
    again = finetune("eval", str(run), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["tuned"]["loss"] == pytest.approx(
        in_training["loss"], abs=1e-4
    )
    examples = [json.loads(line) for line in (tmp_path / "again" / "examples.jsonl").read_text().splitlines()][:3]
    for example in examples:
        assert _plain_peft_greedy(model_dir, run / "adapter", example["prompt"], 6) == example["tuned"]


@pytest.mark.slow
def test_a_killed_run_with_new_tokens_resumes_to_the_uninterrupted_adapter(base_model_dir, tmp_path):
    from training import adapter_tensors, start, wait_for_step

    model_dir = base_model_dir("llama")
    recipe = write_recipe(tmp_path, model_dir)
    recipe.write_text(recipe.read_text().replace("max_steps: 8", "max_steps: 12\n  save_every: 4"))
    sets = [a for s in NEW_TOKENS for a in ("--set", s)]
    _train(recipe, tmp_path, *NEW_TOKENS, "output_dir=runs/full")
    proc = start(recipe, tmp_path, *sets, "--set", "output_dir=runs/killed")
    run = tmp_path / "runs" / "killed"
    wait_for_step(run, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _train(recipe, tmp_path, *NEW_TOKENS, "output_dir=runs/killed", "--resume")
    assert json.loads((run / "manifest.json").read_text())["resumes"][0]["from_step"] in (4, 8)
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys() and any("trainable_tokens_delta" in n for n in got)
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "full"), abs=1e-6)
