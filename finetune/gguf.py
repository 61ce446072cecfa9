"""GGUF for llama.cpp and Ollama: converted by llama.cpp's own tools, verified by generating with llama.cpp.

Nothing here writes GGUF itself. llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` (with the
`gguf-py` they ship: the PyPI `gguf` package does not drive the current converter) write the files, and
llama.cpp's quantizer (`llama_model_quantize`, through llama-cpp-python) makes the quantized types. Where
they are: FINETUNE_LLAMA_CPP (a folder holding the two scripts and gguf-py), else the `.engines/llama.cpp`
folder `scripts/setup_engines.sh` fills beside this package.

The one thing finetune tells the converter: a byte-level BPE vocabulary whose pre-tokenizer llama.cpp does
not recognise (it identifies them by hashing the tokens of a fixed text, and refuses unknown ones) gets the
pre-tokenizer name derived from tokenizer.json, only where that derivation is sound (`pre_tokenizer`);
otherwise the conversion is refused with the reason. The verification then proves it: llama.cpp's token ids
for every held-out prompt must equal the run's tokenizer's.

Verified, not guessed: the file is loaded in llama.cpp and answers the held-out prompts greedily
(eval/examples.jsonl: the prompts rendered with the run's own template, and eval's answers). f32/f16 must
give eval's answers on every prompt; a quantized type reports its agreement and the largest logit
difference from the f32 conversion over the answers' tokens, and passes at MIN_AGREEMENT.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

CONVERTER_ENV = "FINETUNE_LLAMA_CPP"
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
UNQUANTIZED = ("f32", "f16")  # written by the converter itself; must answer exactly as eval did
# quantized types: the share of held-out answers that must equal eval's. q8_0 is llama.cpp's near-lossless
# type (8 bits per weight plus a scale per 32); q4_k_m trades answers for size, and says by how much.
MIN_AGREEMENT = {"q8_0": 0.9, "q4_k_m": 0.5}
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
CONVERTER_TAIL = 15  # lines of the converter's output shown when it fails


@dataclass(frozen=True)
class Converter:
    root: Path

    @property
    def model_script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def lora_script(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"


def find_converter() -> Converter:
    """llama.cpp's converters: FINETUNE_LLAMA_CPP, else the folder scripts/setup_engines.sh fills; UserError if none."""
    chosen = os.environ.get(CONVERTER_ENV)
    root = Path(chosen).expanduser() if chosen else Path(__file__).resolve().parent.parent / ".engines" / "llama.cpp"
    missing = [n for n in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py") if not (root / n).exists()]
    if missing:
        where = f"{CONVERTER_ENV}={chosen}" if chosen else f"{root} (no {CONVERTER_ENV} set)"
        raise UserError(
            f"--format gguf needs llama.cpp's converters; {where} lacks {', '.join(missing)}: run "
            f"`bash scripts/setup_engines.sh llama`, or point {CONVERTER_ENV} at a llama.cpp source folder"
        )
    return Converter(root)


def pre_tokenizer(tokenizer_json: dict[str, Any]) -> tuple[str | None, str]:
    """llama.cpp's pre-tokenizer name for a vocabulary it may not recognise, and why (name None: not derivable).

    Sound only for the plain byte-level BPE of GPT-2: a ByteLevel pre-tokenizer with its own split regex
    (use_regex), no prefix space and no normalizer is exactly llama.cpp's `gpt-2` pre-tokenizer (the same
    regex, then the same byte mapping). Any other split (custom Split regexes, digit splitting, Metaspace...)
    would need its regex matched against llama.cpp's, which we do not guess.
    """
    model = (tokenizer_json.get("model") or {}).get("type")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model != "BPE":
        return None, f"the vocabulary is {model or 'unknown'}, not BPE"
    if tokenizer_json.get("normalizer"):
        return (
            None,
            f"tokenizer.json has a normalizer ({tokenizer_json['normalizer'].get('type')}), which GPT-2's has not",
        )
    if pre.get("type") != "ByteLevel":
        return None, f"its pre-tokenizer is {pre.get('type') or 'none'}, not GPT-2's plain ByteLevel"
    if not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return None, "its ByteLevel pre-tokenizer changes GPT-2's split (use_regex off or add_prefix_space on)"
    return "gpt-2", "byte-level BPE with GPT-2's split regex and no normalizer: llama.cpp's 'gpt-2' pre-tokenizer"


# the converter, run in a child process with the one answer it may lack: a pre-tokenizer name, used only
# when llama.cpp's own table does not recognise the vocabulary (its documented place for new vocabularies)
_DRIVER = """
import runpy, sys
root, script, pre, why = sys.argv[1:5]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if not pre:
            raise NotImplementedError("BPE pre-tokenizer not recognised by llama.cpp, and not derivable: " + why)
        print("finetune: llama.cpp does not know this vocabulary's pre-tokenizer; using " + pre + ": " + why)
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script] + sys.argv[5:]
runpy.run_path(script, run_name="__main__")
"""


def _convert(converter: Converter, script: Path, args: list[str], tokenizer_dir: Path) -> None:
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    pre, why = (None, "no tokenizer.json")
    if tokenizer_file.is_file():
        pre, why = pre_tokenizer(json.loads(tokenizer_file.read_text(encoding="utf-8")))
    argv = [sys.executable, "-c", _DRIVER, str(converter.root), str(script), pre or "", why, *args]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-CONVERTER_TAIL:]
        raise UserError([f"llama.cpp's {script.name} failed (exit {done.returncode}):", *tail])


def convert_model(converter: Converter, model_dir: Path, out: Path, outtype: str) -> Path:
    """A transformers model directory -> one GGUF file, by convert_hf_to_gguf.py (f32/f16 as asked)."""
    _convert(converter, converter.model_script, [str(model_dir), "--outfile", str(out), "--outtype", outtype],
             model_dir)  # fmt: skip
    return out


def convert_adapter(converter: Converter, adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> Path:
    """A PEFT LoRA adapter -> a GGUF LoRA adapter for the base's GGUF, by convert_lora_to_gguf.py."""
    args = ["--base", str(base_dir), "--outfile", str(out), "--outtype", outtype, str(adapter_dir)]
    _convert(converter, converter.lora_script, args, base_dir)
    return out


def quantize(source: Path, out: Path, quant: str) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) from an f32 GGUF to `quant`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise UserError(f"llama.cpp's quantizer failed for {quant} (code {code}) on {source}")
    return out


# --- verification -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One held-out prompt (rendered with the run's template) and the answer eval gave for it."""

    prompt: str
    expected: str


def open_llama(model: Path, adapter: Path | None = None, context: int = 2048):
    """llama.cpp (llama-cpp-python) on one GGUF, optionally with a GGUF LoRA adapter; all logits kept."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError(
            "verifying a GGUF needs llama-cpp-python in this environment: run `bash scripts/setup_engines.sh llama`"
        ) from None
    return Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=context,
                 logits_all=True, verbose=False, seed=0, n_threads=max(1, min(os.cpu_count() or 1, 4)))  # fmt: skip


def _greedy(llm: Any, ids: list[int], stop: set[int], max_new: int) -> list[int]:
    out: list[int] = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token in stop or len(out) == max_new:
            break
        out.append(token)
    return out


def _logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def verify(
    llm: Any, tokenizer: Any, cases: list[Case], stop: list[int], max_new: int, reference: Any = None
) -> dict[str, Any]:
    """Greedy answers of llama.cpp vs eval's, token ids vs the run's tokenizer, and logits vs `reference`'s.

    `reference`: another llama.cpp model (the f32 conversion) whose logits over prompt + eval's answer are
    the yardstick for a quantized file's largest logit difference.
    """
    started = time.perf_counter()
    agreed, token_mismatch, rows, max_diff = 0, [], [], 0.0
    for i, case in enumerate(cases):
        ours = tokenizer(case.prompt, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(case.prompt.encode("utf-8"), add_bos=False, special=True)
        if list(theirs) != list(ours):
            token_mismatch.append(i)
        answer = tokenizer.decode(_greedy(llm, ours, set(stop), max_new), skip_special_tokens=True)
        agreed += answer == case.expected
        rows.append({"prompt": case.prompt, "expected": case.expected, "llama_cpp": answer})
        if reference is not None:
            ids = ours + tokenizer(case.expected, add_special_tokens=False)["input_ids"]
            start = len(ours) - 1
            diff = abs(_logits(llm, ids)[start:] - _logits(reference, ids)[start:]).max()
            max_diff = max(max_diff, float(diff))
    return {
        "prompts": len(cases),
        "agreed": agreed,
        "agreement": agreed / max(len(cases), 1),
        "token_ids_equal": not token_mismatch,
        "token_mismatch_prompts": token_mismatch,
        "max_logit_diff_vs_f32": max_diff if reference is not None else None,
        "seconds": round(time.perf_counter() - started, 2),
        "answers": rows,
    }


def judge(quant: str, check: dict[str, Any]) -> tuple[bool, str]:
    """Pass/fail and the sentence that says why, from verify()'s figures."""
    figures = f"{check['agreed']}/{check['prompts']} answers equal eval's"
    if check["max_logit_diff_vs_f32"] is not None:
        figures += f", largest logit difference from f32 {check['max_logit_diff_vs_f32']:.4g}"
    if not check["token_ids_equal"]:
        return (
            False,
            f"llama.cpp tokenizes prompts {check['token_mismatch_prompts']} differently from the run ({figures})",
        )
    need = 1.0 if quant in UNQUANTIZED else MIN_AGREEMENT[quant]
    if check["agreement"] < need:
        return False, f"{quant}: {figures}; needs {need:.0%}"
    return True, f"{quant}: {figures}"


# --- Ollama Modelfile ---------------------------------------------------------------------------------------

# Go-template counterparts of finetune/templates/*.jinja, for Ollama's TEMPLATE (it renders the whole
# conversation and the model continues, so the generation prompt is always at the end). The template's BOS
# text (<s>, <bos>, <|begin_of_text|>) is left out: llama.cpp adds BOS itself where the GGUF says so.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "qwen2.5": (
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "phi3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": (
        '{{- $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        '{{- $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}[INST] '
        "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}{{ .Content }} [/INST]"
        '{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}'
    ),
    "gemma": (
        '{{- $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        '{{- $first := true }}{{ range .Messages }}{{ if ne .Role "system" }}<start_of_turn>'
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}{{ .Content }}"
        "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    ),
}
# what the Go template cannot say exactly as the jinja does
OLLAMA_CAVEATS = {
    "llama3": "message content is not trimmed (the jinja template trims it); same for content without outer spaces",
    "gemma": "message content is not trimmed (the jinja template trims it); same for content without outer spaces",
}
PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
)


def template_family(tokenizer: Any) -> str | None:
    """Which shipped template (finetune/templates/*.jinja) the run's renders exactly like, on probe conversations."""
    shipped = Path(__file__).resolve().parent / "templates"

    def rendered(template: str | None) -> list[str] | None:
        try:
            return [tokenizer.apply_chat_template(p, chat_template=template, tokenize=False, add_generation_prompt=True)
                    for p in PROBES]  # fmt: skip
        except Exception:  # a template that refuses a probe shape (a system turn) is not that family
            return None

    own = rendered(None)
    if own is None:
        return None
    for family in OLLAMA_TEMPLATES:
        if rendered((shipped / f"{family}.jinja").read_text(encoding="utf-8")) == own:
            return family
    return None


def modelfile(model: str, family: str | None, stops: list[str], adapter: str | None = None) -> tuple[str, list[str]]:
    """An Ollama Modelfile (FROM, ADAPTER, TEMPLATE, one `stop` per stop token) and what it could not express."""
    notes = []
    lines = [f"FROM ./{model}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if family is None:
        notes.append(
            "the run's chat template is not one of finetune's shipped families (chatml, llama3, mistral, qwen2.5, "
            "gemma, phi3), and a Jinja template cannot be turned into Ollama's Go template mechanically: no TEMPLATE "
            "line (Ollama then uses the GGUF's own template metadata, if any); write one by hand"
        )
    else:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""')
        if family in OLLAMA_CAVEATS:
            notes.append(f"{family}: {OLLAMA_CAVEATS[family]}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n", notes


# --- the export: merged model and adapter form, each verified ---------------------------------------------


def cases_of(examples: Path, which: str) -> list[Case]:
    """Held-out prompts and eval's `which` answers ("tuned" or "base") from eval/examples.jsonl."""
    if not examples.is_file():
        raise UserError(f"{examples}: no held-out answers to verify the GGUF against; run `finetune eval` first")
    cases = []
    for line in examples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if isinstance(row.get("prompt"), str) and isinstance(row.get(which), str):
            cases.append(Case(row["prompt"], row[which]))
    if not cases:
        raise UserError(f"{examples}: no rows with a prompt and eval's {which} answer to verify the GGUF against")
    return cases


def stop_tokens(tokenizer: Any, model_dir: Path) -> tuple[list[int], list[str]]:
    """End-of-turn ids as eval stops (generation config's eos ids plus the tokenizer's eos) and their texts."""
    from transformers import GenerationConfig

    from finetune.generation import stop_ids

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = GenerationConfig()
    ids = stop_ids(config, tokenizer)
    return ids, [tokenizer.convert_ids_to_tokens(i) for i in ids]


def base_dir(base: str, revision: str | None) -> Path:
    """The base model's local directory (a hub id: its snapshot in the local cache; convert_lora needs files)."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser().resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, revision=revision, local_files_only=True))
    except Exception as e:
        raise UserError(f"model.base {base}: not in the local hub cache, which the GGUF adapter needs ({e})") from None


def build(run: Any, merged: Path, out: Path, quants: list[str], max_new: int) -> dict[str, Any]:
    """Every GGUF file of the export, each verified; a failed check raises UserError with its figures."""
    from transformers import AutoTokenizer

    converter = find_converter()
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    stop_ids, stop_texts = stop_tokens(tokenizer, merged)
    tuned, base_answers = cases_of(run.dirs.eval / "examples.jsonl", "tuned"), None
    report: dict[str, Any] = {"converter": str(converter.root), "files": {}, "seconds": {}}
    started = time.perf_counter()
    f32 = convert_model(converter, merged, out / "model-f32.gguf", "f32")
    base_f32 = convert_model(converter, base_dir(run.recipe.model.base, run.recipe.model.revision),
                             out / "base-f32.gguf", "f32")  # fmt: skip
    adapter = convert_adapter(converter, run.adapter, base_dir(run.recipe.model.base, run.recipe.model.revision),
                              out / "adapter-f32.gguf", "f32")  # fmt: skip
    report["seconds"]["convert"] = round(time.perf_counter() - started, 2)
    with contextlib.suppress(UserError):  # a run evaluated without the base: no base answers to check
        base_answers = cases_of(run.dirs.eval / "examples.jsonl", "base")
    reference = open_llama(f32)
    failures = []
    for quant in quants:
        started = time.perf_counter()
        model = f32 if quant == "f32" else _made(converter, merged, f32, out / f"model-{quant}.gguf", quant)
        base = base_f32 if quant == "f32" else _made(converter, None, base_f32, out / f"base-{quant}.gguf", quant)
        made = round(time.perf_counter() - started, 2)
        checks = {}
        for form, path, extra, cases in (("merged", model, None, tuned), ("base+adapter", base, adapter, tuned),
                                         ("base", base, None, base_answers)):  # fmt: skip
            if cases is None:
                continue
            llm = reference if path == f32 else open_llama(path, extra)
            check = verify(llm, tokenizer, cases, stop_ids, max_new, None if quant in UNQUANTIZED else reference)
            check["passed"], check["verdict"] = judge(quant, check)
            checks[form] = check
            if not check["passed"]:
                failures.append(f"{form} {path.name}: {check['verdict']}")
        report["files"][quant] = {"model": model.name, "base": base.name, "adapter": adapter.name,
                                  "make_seconds": made, "checks": checks}  # fmt: skip
    if failures:
        raise UserError(["the GGUF export failed its verification (generating with llama.cpp):", *failures])
    family = template_family(tokenizer)
    first = report["files"][quants[0]]
    merged_file, merged_notes = modelfile(first["model"], family, stop_texts)
    adapter_file, _ = modelfile(first["base"], family, stop_texts, adapter.name)
    (out / "Modelfile").write_text(merged_file, encoding="utf-8")
    (out / "Modelfile.adapter").write_text(adapter_file, encoding="utf-8")
    report.update(template_family=family, stop_tokens=stop_texts, modelfile_notes=merged_notes,
                  tokenizer_pre=_pre_of(run.adapter), llama_cpp_python=_llama_version())  # fmt: skip
    return report


def _made(converter: Converter, merged: Path | None, f32: Path, out: Path, quant: str) -> Path:
    """f16 by the converter itself from the model directory (f32 GGUF for a base without one), others quantized."""
    if quant == "f16" and merged is not None:
        return convert_model(converter, merged, out, "f16")
    if quant == "f16":
        return _quantize_f16(f32, out)
    return quantize(f32, out, quant)


def _quantize_f16(source: Path, out: Path) -> Path:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp's quantizer failed for f16 on {source}")
    return out


def _pre_of(tokenizer_dir: Path) -> dict[str, Any]:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return {"name": None, "why": "no tokenizer.json"}
    name, why = pre_tokenizer(json.loads(path.read_text(encoding="utf-8")))
    return {"name": name, "why": why}


def _llama_version() -> str | None:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except ImportError:
        return None


def compat(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compatibility verdicts of a GGUF export: only what ran here is "works"."""
    lines = [f"{q} {form}: {c['verdict']}" for q, f in report["files"].items() for form, c in f["checks"].items()]
    first = next(iter(report["files"].values()))
    ollama_reasons = [f"Modelfile: FROM {first['model']}; Modelfile.adapter: FROM {first['base']} + ADAPTER "
                      f"{first['adapter']}; stop {', '.join(report['stop_tokens'])}",
                      *report["modelfile_notes"]]  # fmt: skip
    return {
        "llama_cpp": {
            "works": True,
            "summary": f"converted by llama.cpp's converter and verified by generating with llama-cpp-python "
            f"{report['llama_cpp_python']} (greedy, held-out prompts, the run's template)",
            "reasons": lines,
            "command": f"llama-cli -m {first['model']}  # or: -m {first['base']} --lora {first['adapter']}",
        },
        "ollama": {
            "works": None,
            "summary": "not run (no Ollama here); the Modelfile is written"
            + (f" with finetune's {report['template_family']} template" if report["template_family"] else ""),
            "reasons": ollama_reasons,
            "command": "ollama create NAME -f Modelfile",
        },
    }
