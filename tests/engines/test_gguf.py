"""`finetune export --format gguf` with llama.cpp's converter and llama-cpp-python: verified files and Modelfiles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from engine_runs import examples, meaningful

from finetune.errors import UserError

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def exported(quickstart_run, tmp_path_factory):
    from finetune.gguf import find_converter

    try:
        find_converter()
        import llama_cpp  # noqa: F401
    except (UserError, ImportError) as e:
        pytest.skip(f"llama.cpp not installed ({e}); run bash scripts/setup_engines.sh")
    out = tmp_path_factory.mktemp("gguf") / "export"
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "export", str(quickstart_run), "--format", "gguf",
                           "--quant", "f16", "--quant", "q8_0", "--out", str(out), "--json"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout)


def test_f16_answers_exactly_as_eval_and_q8_0_reports_its_agreement(exported, quickstart_run):
    out, result = exported
    meaningful(examples(quickstart_run))
    report = json.loads((out / "gguf.json").read_text())
    f16, q8 = report["files"]["f16"], report["files"]["q8_0"]
    for form in ("merged", "base+adapter", "base"):
        check = f16["checks"][form]
        assert check["agreed"] == check["prompts"] == len(examples(quickstart_run)), (form, check["verdict"])
        assert check["token_ids_equal"]
        assert 0.9 <= q8["checks"][form]["agreement"] <= 1.0
        assert q8["checks"][form]["max_logit_diff_vs_f32"] is not None
    for name in (f16["model"], f16["base"], f16["adapter"], q8["model"], q8["base"]):
        assert (out / name).read_bytes()[:4] == b"GGUF"
    assert report["tokenizer_pre"]["name"] == "gpt-2"  # the quickstart's byte-level BPE llama.cpp does not know
    assert result["compat"]["targets"]["llama_cpp"]["works"] is True
    assert result["compat"]["targets"]["ollama"]["works"] is None  # not run here: no Ollama


def test_the_modelfiles_carry_the_template_and_the_stop_token(exported):
    out, _ = exported
    merged, adapter = (out / "Modelfile").read_text(), (out / "Modelfile.adapter").read_text()
    assert merged.startswith("FROM ./model-f16.gguf\n")
    assert adapter.startswith("FROM ./base-f16.gguf\nADAPTER ./adapter-f32.gguf\n")
    for text in (merged, adapter):
        assert "<|im_start|>{{ .Role }}" in text  # the quickstart's template renders as chatml
        assert 'PARAMETER stop "<|im_end|>"' in text
