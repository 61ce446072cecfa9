"""`finetune export --format gguf` with llama.cpp's converter and llama-cpp-python: verified files and Modelfiles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_runs import ROOT, examples, meaningful

from finetune.errors import UserError

pytestmark = pytest.mark.engines
QUANTS = ("f16", "q8_0", "q4_k_m")


def _export(run, out, *quants: str) -> subprocess.CompletedProcess:
    flags = [arg for q in quants for arg in ("--quant", q)]
    return subprocess.run([sys.executable, "-m", "finetune.cli", "export", str(run), "--format", "gguf", *flags,
                           "--out", str(out), "--json"], capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def converter():
    from finetune.gguf import find_converter

    try:
        import llama_cpp  # noqa: F401

        return find_converter()
    except (UserError, ImportError) as e:
        pytest.skip(f"llama.cpp not installed ({e}); run bash scripts/setup_engines.sh llama")


@pytest.fixture(scope="module")
def exported(converter, quickstart_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "export"
    done = _export(quickstart_run, out, *QUANTS)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout)


def test_f16_answers_exactly_as_eval_and_quantized_types_report_their_figures(exported, quickstart_run):
    out, result = exported
    rows = examples(quickstart_run)
    meaningful(rows)
    report = json.loads((out / "gguf.json").read_text())
    assert report["context"] == 64 + 32  # the run's max_seq_length + eval's max_new_tokens, within the model's 512
    f16 = report["files"]["f16"]
    for form in ("merged", "base+adapter", "base"):
        check = f16["checks"][form]
        assert check["agreed"] == check["prompts"] == len(rows), (form, check["verdict"])
        assert check["token_ids_equal"] and check["max_logit_diff_vs_f32"] is None
        for quant in ("q8_0", "q4_k_m"):
            q = report["files"][quant]["checks"][form]
            assert q["passed"] and 0 < q["max_logit_diff_vs_f32"] < 5 and 0.5 <= q["argmax_agreement_vs_f32"] <= 1
    assert report["files"]["q8_0"]["checks"]["merged"]["agreement"] >= 0.9
    for quant in QUANTS:
        files = report["files"][quant]
        for name in (files["model"], files["base"], files["adapter"]):
            assert (out / name).read_bytes()[:4] == b"GGUF" and files["bytes"][name] == (out / name).stat().st_size
    assert not (out / "model-f32.gguf").exists()  # the quantizer's source, not asked for
    sizes = {q: report["files"][q]["bytes"][f"model-{q}.gguf"] for q in QUANTS}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert report["tokenizer_pre"]["name"] == "gpt-2"  # the quickstart's byte-level BPE llama.cpp does not know
    targets = result["compat"]["targets"]
    assert targets["llama_cpp"]["works"] is True
    assert targets["ollama"]["works"] is None and "not installed" in targets["ollama"]["summary"]


def test_the_modelfiles_carry_the_template_and_the_stop_token(exported):
    out, _ = exported
    merged, adapter = (out / "Modelfile").read_text(), (out / "Modelfile.adapter").read_text()
    assert merged.startswith("FROM ./model-f16.gguf\n")
    assert adapter.startswith("FROM ./base-f16.gguf\nADAPTER ./adapter-f32.gguf\n")
    for text in (merged, adapter):
        assert "<|im_start|>{{ .Role }}" in text  # the quickstart's template renders as chatml
        assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_gguf_that_does_not_answer_as_eval_did_fails_the_export_with_its_figures(converter, quickstart_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    lines = (run / "eval" / "examples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["tuned"] += " (not what the model said)"
    (run / "eval" / "examples.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    done = _export(run, tmp_path / "out", "f16")
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"merged model-f16.gguf: f16: {len(lines) - 1}/{len(lines)} answers equal eval's; needs 100%" in done.stderr
    failed = json.loads(done.stdout)
    assert failed["passed"] is False and failed["gguf"]["files"]["f16"]["checks"]["base"]["passed"]
    assert not (tmp_path / "out").exists()  # nothing that looks complete is left behind


def test_a_vocabulary_llama_cpp_does_not_know_and_we_cannot_derive_is_refused_with_the_reason(converter, tmp_path):
    from finetune.gguf import convert_model

    model = tmp_path / "model"
    shutil.copytree(ROOT / "assets" / "quickstart" / "model", model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFKC"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UserError, match=r"cannot be converted to GGUF: .*normalizer \(NFKC\)"):
        convert_model(converter, model, tmp_path / "m.gguf", "f32")


def test_a_loftq_run_exports_its_merged_model_only_which_answers_as_eval(converter, tmp_path):
    """A LoftQ adapter is relative to the NF4 base: its merged model (on the NF4 weights dequantized) is the trained
    model; the adapter on the original base's GGUF is not (77/100 of eval's answers, measured), so that form is
    not made and the report says why."""
    from finetune.recipe.load import load_recipe
    from finetune.train import train

    sets = [f"output_dir={tmp_path / 'loftq'}", "train.max_steps=20", "data.eval.0.limit=10",
            "lora.init.method=loftq", "quantization.method=nf4"]  # fmt: skip
    run = Path(train(load_recipe(ROOT / "recipes" / "quickstart.yaml", sets), progress=False).run_dir)
    done = _export(run, tmp_path / "out", "f16")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gguf.json").read_text())
    assert report["adapter_form"].startswith("not made: a LoftQ adapter is relative to the NF4 base")
    check = report["files"]["f16"]["checks"]["merged"]
    assert set(report["files"]["f16"]["checks"]) == {"merged"} and check["agreed"] == check["prompts"] == 10
    assert not list((tmp_path / "out").glob("base-*.gguf")) and not list((tmp_path / "out").glob("adapter-*.gguf"))
