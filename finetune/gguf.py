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
FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
CONVERTER_TAIL = 15  # lines of the converter's output shown when it fails
REFUSED = "finetune: refused: "  # how the driver marks a vocabulary it will not guess a pre-tokenizer for


class GGUFCheckError(RuntimeError):
    """A GGUF file did not answer as eval did (figures in `report`): exit 1, nothing written."""

    exit_code = 1

    def __init__(self, failures: list[str], report: dict[str, Any]):
        super().__init__("\n".join(["the GGUF export failed its verification (generating with llama.cpp):", *failures]))
        self.report = report


class ConversionError(RuntimeError):
    """llama.cpp's converter or quantizer failed on a model it was expected to take: exit 1, with its output."""


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
            print("finetune: refused: llama.cpp does not recognise this BPE vocabulary's pre-tokenizer, and finetune "
                  "will not guess one: " + why, file=sys.stderr)
            raise SystemExit(3)
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
        output = (done.stdout + done.stderr).strip().splitlines()
        refused = [line.removeprefix(REFUSED) for line in output if line.startswith(REFUSED)]
        if refused:  # the input cannot be converted soundly: the user's to change (another tokenizer), exit 2
            raise UserError(f"{tokenizer_dir}: cannot be converted to GGUF: {refused[0]}")
        raise ConversionError("\n".join([f"llama.cpp's {script.name} failed (exit {done.returncode}):",
                                         *output[-CONVERTER_TAIL:]]))  # fmt: skip


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
    """llama.cpp's quantizer (llama_model_quantize) from an f32 GGUF to `quant` (f16 too: one path for both forms)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise ConversionError(f"llama.cpp's quantizer failed for {quant} (code {code}) on {source}")
    return out


# --- verification -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One held-out prompt (rendered with the run's template) and the answer eval gave for it."""

    prompt: str
    expected: str


def open_llama(model: Path, context: int, adapter: Path | None = None):
    """llama.cpp (llama-cpp-python) on one GGUF, optionally with a GGUF LoRA adapter, every position's logits kept.

    `context` is the run's own (context()), so llama.cpp runs the model as training and eval did.
    """
    try:
        import llama_cpp.llama_cpp as native
        from llama_cpp import Llama
    except ImportError:
        raise UserError(
            "verifying a GGUF needs llama-cpp-python in this environment: run `bash scripts/setup_engines.sh llama`"
        ) from None
    # llama.cpp's "extra buffer types" repack weights for the CPU's widest kernels, AMX among them when the CPU
    # advertises it. Virtual machines that advertise AMX without enabling its tile state (this project's CPU
    # machines) die of SIGILL in the q8_0/q4_k kernels, taking finetune with them. The verification checks the
    # file, not a kernel: it runs llama.cpp's plain CPU kernels. Llama() offers no switch, so its default model
    # parameters are swapped for the load alone.
    default = native.llama_model_default_params

    def params() -> Any:
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    native.llama_model_default_params = params
    try:
        return Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=context,
                     n_batch=context, logits_all=True, verbose=False, seed=0, n_threads=_threads(model))  # fmt: skip
    finally:
        native.llama_model_default_params = default


SMALL_MODEL_BYTES = 256 * 2**20


def _threads(model: Path) -> int:
    """One thread for a small model: its matrices are too small to split, and ggml's threads meet at a barrier
    after every operation (measured on the quickstart under load: 30 tokens in 0.14 s on one thread, 4.5 s on
    two); up to 4 for a real one."""
    return 1 if model.stat().st_size < SMALL_MODEL_BYTES else max(1, min(os.cpu_count() or 1, 4))


def context(model_dir: Path, max_seq_length: int, max_new: int) -> int:
    """llama.cpp's n_ctx: the run's max_seq_length plus eval's max_new_tokens, within the model's own context."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    trained = config.get("max_position_embeddings") or config.get("n_positions")
    wanted = max_seq_length + max_new
    return min(wanted, trained) if trained else wanted


def _greedy(llm: Any, ids: list[int], stop: set[int], max_new: int) -> list[int]:
    """Greedy decoding as eval does it (argmax of each next-token logit row, stop ids excluded), no sampler."""
    import numpy as np

    out: list[int] = []
    llm.reset()
    llm.eval(ids)
    while len(out) < max_new:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop:
            break
        out.append(token)
        llm.eval([token])
    return out


def _logits(llm: Any, ids: list[int], start: int) -> Any:
    """Logits of every position from `start` on, teacher-forced over `ids` (float64)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[start : len(ids)], dtype=np.float64)


def verify(
    llm: Any, tokenizer: Any, cases: list[Case], stop: list[int], max_new: int, reference: list[Any] | None = None
) -> dict[str, Any]:
    """Greedy answers of llama.cpp vs eval's, token ids vs the run's tokenizer, and logits vs `reference`'s.

    `reference`: per case, the f32 conversion's logits over prompt + eval's answer (reference_logits), the
    yardstick for a quantized file's largest logit difference.
    """
    started = time.perf_counter()
    agreed, token_mismatch, rows, max_diff, same, positions = 0, [], [], 0.0, 0, 0
    for i, case in enumerate(cases):
        ours = tokenizer(case.prompt, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(case.prompt.encode("utf-8"), add_bos=False, special=True)
        if list(theirs) != list(ours):
            token_mismatch.append(i)
        answer = tokenizer.decode(_greedy(llm, ours, set(stop), max_new), skip_special_tokens=True)
        agreed += answer == case.expected
        rows.append({"prompt": case.prompt, "expected": case.expected, "llama_cpp": answer})
        if reference is not None:
            ids, start = _teacher_forced(tokenizer, case)
            logits = _logits(llm, ids, start)
            max_diff = max(max_diff, float(abs(logits - reference[i]).max()))
            same += int((logits.argmax(-1) == reference[i].argmax(-1)).sum())
            positions += len(logits)
    return {
        "prompts": len(cases),
        "agreed": agreed,
        "agreement": agreed / max(len(cases), 1),
        "token_ids_equal": not token_mismatch,
        "token_mismatch_prompts": token_mismatch,
        "max_logit_diff_vs_f32": max_diff if reference is not None else None,
        "argmax_agreement_vs_f32": same / max(positions, 1) if reference is not None else None,
        "seconds": round(time.perf_counter() - started, 2),
        "answers": rows,
    }


def _teacher_forced(tokenizer: Any, case: Case) -> tuple[list[int], int]:
    """Prompt + eval's answer as ids, and the first position whose logits predict an answer token."""
    prompt = tokenizer(case.prompt, add_special_tokens=False)["input_ids"]
    return prompt + tokenizer(case.expected, add_special_tokens=False)["input_ids"], len(prompt) - 1


def reference_logits(llm: Any, tokenizer: Any, cases: list[Case]) -> list[Any]:
    """The f32 conversion's logits over each case's prompt + eval's answer (what quantized files are held to)."""
    return [_logits(llm, *_teacher_forced(tokenizer, case)) for case in cases]


def judge(quant: str, check: dict[str, Any], form: str = "merged") -> tuple[bool, str]:
    """Pass/fail and the sentence that says why, from verify()'s figures.

    The base alone, quantized, is reported and not held to MIN_AGREEMENT: it answers the held-out prompts with
    max_new_tokens of text that never stops, where one changed token anywhere changes the whole answer; what
    ships with it (base + adapter) is held to it.
    """
    figures = f"{check['agreed']}/{check['prompts']} answers equal eval's"
    if check["max_logit_diff_vs_f32"] is not None:
        figures += (f", largest logit difference from f32 {check['max_logit_diff_vs_f32']:.4g}, greedy token as "
                    f"f32's at {check['argmax_agreement_vs_f32']:.1%} of eval's answer positions")  # fmt: skip
    if not check["token_ids_equal"]:
        return (
            False,
            f"llama.cpp tokenizes prompts {check['token_mismatch_prompts']} differently from the run ({figures})",
        )
    if form == "base" and quant not in UNQUANTIZED:
        return True, f"{quant}: {figures} (reported, not judged: the base's answers never stop)"
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


def build(run: Any, merged: Path, out: Path, quants: list[str], progress: Any) -> dict[str, Any]:
    """Every GGUF file of the export, each verified; a failed check raises GGUFCheckError with its figures."""
    from transformers import AutoTokenizer

    converter = find_converter()
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    stop_ids, stop_texts = stop_tokens(tokenizer, merged)
    max_new = run.recipe.eval.max_new_tokens
    n_ctx = context(merged, run.recipe.data.max_seq_length, max_new)
    examples = run.dirs.eval / "examples.jsonl"
    answers = {"tuned": cases_of(examples, "tuned"), "base": None}
    with contextlib.suppress(UserError):  # a run evaluated without the base: no base answers to check
        answers["base"] = cases_of(examples, "base")
    report: dict[str, Any] = {"converter": str(converter.root), "context": n_ctx, "max_new_tokens": max_new,
                              "convert_seconds": {}, "files": {}}  # fmt: skip
    timed = _timer(report["convert_seconds"], progress)
    f32 = timed("model-f32.gguf", lambda p: convert_model(converter, merged, p, "f32"), out)
    if why := _no_adapter_form(run):  # the merged model alone: see merged_only
        report["adapter_form"] = f"not made: {why}"
        return merged_only(run, f32, out, quants, tokenizer, answers["tuned"], (stop_ids, stop_texts), report, progress)
    base = base_dir(run.recipe.model.base, run.recipe.model.revision)
    base_f32 = timed("base-f32.gguf", lambda p: convert_model(converter, base, p, "f32"), out)
    adapter = timed("adapter-f32.gguf", lambda p: convert_adapter(converter, run.adapter, base, p, "f32"), out)
    references = _references(f32, base_f32, n_ctx, tokenizer, answers, quants)
    failures = []
    for quant in quants:
        made: dict[str, float] = {}
        make = _timer(made, progress)
        model = f32 if quant == "f32" else make(f"model-{quant}.gguf", lambda p, q=quant: quantize(f32, p, q), out)
        base_q = (
            base_f32 if quant == "f32" else make(f"base-{quant}.gguf", lambda p, q=quant: quantize(base_f32, p, q), out)
        )
        checks = {}
        for form, path, lora, which in (("merged", model, None, "tuned"), ("base+adapter", base_q, adapter, "tuned"),
                                        ("base", base_q, None, "base")):  # fmt: skip
            if answers[which] is None:
                continue
            with contextlib.closing(open_llama(path, n_ctx, lora)) as llm:
                check = verify(llm, tokenizer, answers[which], stop_ids, max_new,
                               None if quant in UNQUANTIZED else references[which])  # fmt: skip
            check["passed"], check["verdict"] = judge(quant, check, form)
            progress(f"{quant} {form}: {check['verdict']} ({check['seconds']:.1f} s)")
            checks[form] = check
            if not check["passed"]:
                failures.append(f"{form} {path.name}: {check['verdict']}")
        report["files"][quant] = {"model": model.name, "base": base_q.name, "adapter": adapter.name,
                                  "bytes": {p.name: p.stat().st_size for p in (model, base_q, adapter)},
                                  "make_seconds": made, "checks": checks}  # fmt: skip
    if failures:
        raise GGUFCheckError(failures, report)
    if "f32" not in quants:  # the quantizer's source, not asked for: as large as the model in float32
        f32.unlink()
        base_f32.unlink()
    _modelfiles(report, out, template_family(tokenizer), stop_texts)
    report.update(tokenizer_pre=_pre_of(run.adapter), llama_cpp_python=_llama_version())
    return report


def _no_adapter_form(run: Any) -> str | None:
    """Why a run has no base + adapter GGUF form, or None when it has one."""
    if run.manifest.get("new_tokens"):
        return "the run added tokens"
    if run.recipe.lora.init.on_quantized_base:
        return ("a LoftQ adapter is relative to the NF4 base, and the base's GGUF is converted from its original "
                "weights")  # fmt: skip
    return None


def merged_only(
    run: Any, f32: Path, out: Path, quants: list[str], tokenizer: Any, tuned: list[Case],
    stops: tuple[list[int], list[str]], report: dict, progress: Any,
) -> dict[str, Any]:  # fmt: skip
    """Only the merged model, converted and verified, with no base + adapter form (nor its Modelfile.adapter):
    for a run that added tokens (data.add_special_tokens), whose merged vocabulary holds them, because llama.cpp's
    LoRA converter stops at trained embedding rows and the base's GGUF has no ids for the new tokens; for a LoftQ
    run, whose merged model is built on the NF4 weights dequantized (finetune.merge), because its adapter on the
    original base's GGUF is not the trained model (measured: 77/100 of eval's answers)."""
    n_ctx, max_new = report["context"], report["max_new_tokens"]
    stop_ids, stop_texts = stops
    references = None
    if not all(q in UNQUANTIZED for q in quants):
        with contextlib.closing(open_llama(f32, n_ctx)) as llm:
            references = reference_logits(llm, tokenizer, tuned)
    failures = []
    for quant in quants:
        made: dict[str, float] = {}
        model = f32 if quant == "f32" else _timer(made, progress)(f"model-{quant}.gguf",
                                                                 lambda p, q=quant: quantize(f32, p, q), out)  # fmt: skip
        with contextlib.closing(open_llama(model, n_ctx)) as llm:
            check = verify(llm, tokenizer, tuned, stop_ids, max_new, None if quant in UNQUANTIZED else references)
        check["passed"], check["verdict"] = judge(quant, check, "merged")
        progress(f"{quant} merged: {check['verdict']} ({check['seconds']:.1f} s)")
        if not check["passed"]:
            failures.append(f"merged {model.name}: {check['verdict']}")
        report["files"][quant] = {"model": model.name, "bytes": {model.name: model.stat().st_size},
                                  "make_seconds": made, "checks": {"merged": check}}  # fmt: skip
    if failures:
        raise GGUFCheckError(failures, report)
    if "f32" not in quants:
        f32.unlink()
    first = next(iter(report["files"].values()))
    text, notes = modelfile(first["model"], template_family(tokenizer), stop_texts)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    report.update(template_family=template_family(tokenizer), stop_tokens=stop_texts, modelfile_notes=notes,
                  modelfiles={"Modelfile": first["model"]},
                  tokenizer_pre=_pre_of(run.adapter), llama_cpp_python=_llama_version())  # fmt: skip
    return report


def _timer(into: dict[str, float], progress: Any) -> Any:
    """make(name, write, out): write out/name, record its seconds in `into`, say so; returns the path."""

    def make(name: str, write: Any, out: Path) -> Path:
        started = time.perf_counter()
        path = write(out / name)
        into[name] = round(time.perf_counter() - started, 2)
        progress(f"wrote {name} ({path.stat().st_size / 1e6:.1f} MB) in {into[name]:.1f} s")
        return path

    return make


def _references(f32: Path, base_f32: Path, n_ctx: int, tokenizer: Any, answers: dict, quants: list[str]) -> dict:
    """The f32 files' logits over eval's answers (merged for the tuned answers, base for the base's), if needed."""
    if all(q in UNQUANTIZED for q in quants):
        return {}
    refs = {}
    for which, path in (("tuned", f32), ("base", base_f32)):
        if answers[which] is not None:
            with contextlib.closing(open_llama(path, n_ctx)) as llm:
                refs[which] = reference_logits(llm, tokenizer, answers[which])
    return refs


def _modelfiles(report: dict[str, Any], out: Path, family: str | None, stops: list[str]) -> None:
    """Modelfile (the merged model) and Modelfile.adapter (base + GGUF adapter), for the first --quant asked."""
    first = next(iter(report["files"].values()))
    merged_text, notes = modelfile(first["model"], family, stops)
    adapter_text, _ = modelfile(first["base"], family, stops, first["adapter"])
    (out / "Modelfile").write_text(merged_text, encoding="utf-8")
    (out / "Modelfile.adapter").write_text(adapter_text, encoding="utf-8")
    report.update(template_family=family, stop_tokens=stops, modelfile_notes=notes,
                  modelfiles={"Modelfile": first["model"], "Modelfile.adapter": f"{first['base']} + {first['adapter']}"})  # fmt: skip


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
    adapter_form = "adapter" in first  # not for a run that added tokens (merged_only)
    with_adapter = f"; Modelfile.adapter: FROM {first['base']} + ADAPTER {first['adapter']}" if adapter_form else ""
    ollama_reasons = [f"Modelfile: FROM {first['model']}{with_adapter}; stop {', '.join(report['stop_tokens'])}",
                      *report["modelfile_notes"]]  # fmt: skip
    return {
        "llama_cpp": {
            "works": True,
            "summary": f"converted by llama.cpp's converter and verified by generating with llama-cpp-python "
            f"{report['llama_cpp_python']} (greedy, held-out prompts, the run's template)",
            "reasons": lines,
            "command": f"llama-cli -m {first['model']}"
            + (f"  # or: -m {first['base']} --lora {first['adapter']}" if adapter_form else ""),
        },
        "ollama": {
            "works": None,
            "summary": "not checked: Ollama is not installed here, so no `ollama create` was run; the Modelfiles "
            "are written"
            + (f" with finetune's {report['template_family']} template" if report["template_family"] else ""),
            "reasons": ollama_reasons,
            "command": "ollama create NAME -f Modelfile",
        },
    }
