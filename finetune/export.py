"""`finetune export`: a run's adapter, or its verified merged model, ready to publish.

Both formats carry a model card (README.md with Hugging Face front matter, the training figures
from manifest.json and the held-out results from eval/summary.json), the resolved recipe, and a
compatibility report (compat.json, also in the card). The report's words are kept honest: "works"
only for what was actually run on the export (the merge check reloads a merged model with plain
transformers), "does not work" for what the adapter's own config and tensors rule out (a rule the
runtime is known to enforce, named in the reasons), and "not checked", with the reason, for the rest.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.files import atomic_dir, write_json_atomic
from finetune.lineage import lineage
from finetune.merge import Progress, merge_dtype, merge_into
from finetune.recipe.load import is_local
from finetune.runs import Result, Run, claim_output, open_run, read_summary, run_seconds
from finetune.runtimes import adapter_facts, adapter_vllm
from finetune.runtimes import verdict as _verdict
from finetune.units import duration

FORMATS = ("adapter", "merged", "gguf")
DEFAULT_QUANTS = ("f16", "q8_0")  # --format gguf without --quant


@dataclass
class ExportResult(Result):
    run_dir: str
    out_dir: str
    format: str
    files: list[str]
    compat: dict[str, Any]
    merge_check: dict[str, Any] | None
    seconds: float
    notes: list[str]


def export(
    run_dir: str | Path,
    format: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,  # merged only
    progress: Progress | None = None,
    quants: list[str] | None = None,  # gguf only
) -> ExportResult:
    """Write the adapter (or the verified merged model) with its card, recipe and compatibility report."""
    started = time.perf_counter()
    if format not in FORMATS:
        raise UserError(f"--format: must be one of {', '.join(FORMATS)} (got {format!r})")
    if format == "adapter" and dtype is not None:
        raise UserError("--dtype: only applies to --format merged (the adapter is exported as trained)")
    quants = _quants(format, quants)
    run = open_run(run_dir)
    target = Path(out).expanduser().resolve() if out else run.root / "export" / format
    claim_output(target, overwrite, run)
    dtype_name = merge_dtype(run.recipe, dtype) if format in ("merged", "gguf") else None
    notes = list(run.notes)
    check = None
    with atomic_dir(target) as tmp:
        if format == "adapter":
            for src in sorted(run.adapter.iterdir()):
                if src.is_file() and src.name != "README.md":  # PEFT's generic card is replaced by ours
                    shutil.copy2(src, tmp / src.name)
        elif format == "merged":
            check, merge_notes = merge_into(run, tmp, dtype_name, progress or (lambda _: None))
            notes += merge_notes
        if format == "gguf":
            check, compat = _gguf_into(run, tmp, dtype_name, quants, progress or (lambda _: None))
        else:
            compat = compatibility(run, format, tmp)
        shutil.copy2(run.dirs.recipe, tmp / "recipe.yaml")
        write_json_atomic(tmp / "compat.json", compat)
        (tmp / "README.md").write_text(model_card(run, format, compat, check), encoding="utf-8")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    return ExportResult(
        run_dir=str(run.root),
        out_dir=str(target),
        format=format,
        files=files,
        compat=compat,
        merge_check=check,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _quants(format: str, quants: list[str] | None) -> list[str]:
    from finetune.gguf import QUANTS

    if format != "gguf":
        if quants:
            raise UserError("--quant: only applies to --format gguf")
        return []
    bad = [q for q in quants or [] if q not in QUANTS]
    if bad:
        raise UserError(f"--quant: {', '.join(bad)} is not one of {', '.join(QUANTS)}")
    return list(dict.fromkeys(quants or DEFAULT_QUANTS))


def _gguf_into(run: Run, tmp: Path, dtype_name: str | None, quants: list[str], progress: Progress) -> tuple[dict, dict]:
    """The merged model (checked as for --format merged, then removed), converted to GGUF and verified by llama.cpp."""
    from finetune import gguf

    merged = tmp / ".merged"
    merged.mkdir()
    check, _ = merge_into(run, merged, dtype_name, progress)
    progress(f"converting to GGUF ({', '.join(quants)}) with llama.cpp's converter, then verifying with llama.cpp")
    report = gguf.build(run, merged, tmp, quants, progress)
    shutil.rmtree(merged)
    write_json_atomic(tmp / "gguf.json", report)
    first = next(iter(report["files"].values()))  # the first --quant: the file the model card's snippet loads
    files = {k: first[k] for k in ("model", "base", "adapter") if k in first}  # a run that added tokens: model only
    return check, {"format": "gguf", "adapter": adapter_facts(run), "files": files, "targets": gguf.compat(report)}


# --- compatibility ----------------------------------------------------------------------------------


def compatibility(run: Run, format: str, exported: Path | None = None) -> dict[str, Any]:
    """What will and will not load the export; `exported` is the directory holding it (merged: its config.json)."""
    facts = adapter_facts(run)
    if format == "merged":
        targets = {
            "transformers": _merged_transformers(exported),
            "vllm": _merged_vllm(exported),
            "gguf": _merged_gguf(),
        }
    else:
        targets = {
            "transformers_peft": _adapter_transformers(facts),
            "vllm": adapter_vllm(facts, run),
            "gguf": _adapter_gguf(facts),
        }
    return {"format": format, "adapter": facts, "targets": targets}


def _adapter_transformers(facts: dict) -> dict:
    revision = f', revision="{facts["base_revision"]}"' if facts["base_revision"] else ""
    command = f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{facts["base_model"]}"{revision}), "<this directory>")'
    reasons = []
    if facts["variant"] == "dora":
        reasons.append("DoRA recomputes its weight norms at every forward pass: merge it for fast inference")
    if facts["quantization_in_training"] != "none":
        reasons.append(
            f"trained on a {facts['quantization_in_training']}-quantized base: load the base with the same "
            "BitsAndBytesConfig to reproduce training-time outputs exactly"
        )
    if new := facts.get("new_tokens"):
        command = (f'base = AutoModelForCausalLM.from_pretrained("{facts["base_model"]}"{revision}); '
                   'base.resize_token_embeddings(len(AutoTokenizer.from_pretrained("<this directory>")), '
                   'mean_resizing=False); PeftModel.from_pretrained(base, "<this directory>")')  # fmt: skip
        reasons.append(
            f"the run added {len(new['ids'])} tokens ({', '.join(new['tokens'])}): grow the base's embeddings to the "
            "length of this directory's tokenizer before loading the adapter, which holds the new rows "
            f"({new['mode']})"
        )
    reasons.insert(0, "the adapter is PEFT's own format as training saved it (adapter_config.json and the "
                      "safetensors header were read); export --format merged loads it onto the base and checks it")  # fmt: skip
    return _verdict(None, "export --format adapter loads no model", reasons, command)


def gguf_converter(script: str) -> dict[str, str | None]:
    """llama.cpp's conversion script on PATH, and the gguf Python package it is built on, where installed."""
    version = None
    if importlib.util.find_spec("gguf") is not None:
        try:
            version = metadata.version("gguf")
        except metadata.PackageNotFoundError:
            version = "unknown version"
    return {"script": shutil.which(script), "gguf_package": version}


def _converter_summary(converter: dict, script: str) -> str | None:
    if converter["script"]:
        return f"{script} at {converter['script']}"
    if converter["gguf_package"]:
        return f"the gguf package ({converter['gguf_package']}); {script} itself comes with llama.cpp's source"
    return None


def _adapter_gguf(facts: dict) -> dict:
    script = "convert_lora_to_gguf.py"
    converter = gguf_converter(script)
    found = _converter_summary(converter, script)
    if found is None:
        return _verdict(None, f"no llama.cpp converter was run (none installed: {script}, or the gguf package)", [])
    blockers = []
    if facts["magnitude_vectors"]:
        blockers.append(f"DoRA: {script} accepts only lora_A/lora_B tensors, not DoRA's magnitude vectors")
    if facts.get("new_tokens"):
        blockers.append(
            f'{script} takes lora_A/lora_B tensors only and stops at trained embedding rows ("Embeddings is present '
            'in the adapter. This can be due to new tokens added during fine tuning"; read in its source, not run): '
            "export --format gguf converts the merged model, whose vocabulary holds the new tokens"
        )
    elif facts["full_tensors"]:
        shown = ", ".join(facts["full_tensors"][:3]) + (" ..." if len(facts["full_tensors"]) > 3 else "")
        blockers.append(f"{script} refuses whole tensors (modules_to_save: {shown})")
    if facts["variant"] == "rslora":
        factor = math.sqrt(facts["rank"])
        blockers.append(
            f"llama.cpp scales every adapter by alpha/rank; this rsLoRA adapter needs alpha/sqrt(rank), so it would "
            f"be applied {factor:.3g}x too weakly: export --format merged and convert the merged model"
        )
    if blockers:
        return _verdict(False, "does not convert to a GGUF LoRA adapter", [f"converter: {found}", *blockers])
    base = facts["base_model"]
    flag = f"--base {base}" if is_local(base) else f"--base-model-id {base}"
    return _verdict(
        None,
        "no llama.cpp converter was run",
        [f"converter found: {found}", "nothing in the adapter's files rules the LoRA converter out"],
        f"python {script} {flag} --outfile adapter.gguf <this directory>",
    )


def _merged_transformers(exported: Path | None) -> dict:
    command = 'AutoModelForCausalLM.from_pretrained("<this directory>")'
    check = _read_check(exported)
    if check is None or not check.get("passed"):
        return _verdict(None, "no merge check of this directory was found", [], command)
    return _verdict(
        True, "loads with plain transformers", [], command,
        checked=f"the merge check reloaded this directory with transformers and its logits matched base + adapter "
        f"(max abs difference {check['max_abs_diff']:.3g}, tolerance {check['tolerance']:.3g})",
    )  # fmt: skip


def _read_check(exported: Path | None) -> dict | None:
    path = None if exported is None else exported / "merge_check.json"
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _merged_vllm(exported: Path | None) -> dict:
    architectures = None
    if exported is not None and (exported / "config.json").is_file():
        architectures = json.loads((exported / "config.json").read_text(encoding="utf-8")).get("architectures")
    arch = ", ".join(architectures or ["unknown"])
    return _verdict(
        None,
        "vLLM was not run; a merged model needs no LoRA flags or --max-lora-rank",
        [f"architecture {arch}: vLLM serves it if it is in vLLM's supported-models list, as for the base"],
        "vllm serve <this directory>",
    )


def _merged_gguf() -> dict:
    script = "convert_hf_to_gguf.py"
    converter = gguf_converter(script)
    found = _converter_summary(converter, script)
    if found is None:
        return _verdict(None, f"no llama.cpp converter was run (none installed: {script}, or the gguf package)", [])
    return _verdict(
        None,
        "no llama.cpp converter was run",
        [f"converter found: {found}", "llama.cpp converts only the architectures and tokenizers (pre-tokenizers) "
         "it recognises; only running it tells"],
        f"python {script} <this directory> --outfile model.gguf",
    )  # fmt: skip


# --- model card ---------------------------------------------------------------------------------------


def model_card(run: Run, format: str, compat: dict, check: dict | None) -> str:
    """README.md: Hugging Face front matter, what it is, how to use it, training, data, eval, compatibility."""
    recipe, manifest = run.recipe, run.manifest
    base = recipe.model.base
    variant = run.variant
    method = "qlora" if run.quantized else "lora"
    combined = manifest.get("kind") == "combined"
    tags = [
        "finetune",
        "peft",
        "lora",
        *([method] if method != "lora" else []),
        *([variant] if variant != "lora" else []),
    ]
    tags += ["trl", recipe.train.method] if not combined else ["adapter-merging"]
    hub_datasets = [s.path for s in recipe.data.train if not is_local(s.path)]
    meta: dict[str, Any] = {
        "library_name": {"adapter": "peft", "gguf": "gguf"}.get(format, "transformers"),
        "base_model": base,
        "base_model_relation": "adapter" if format == "adapter" else "finetune",
        "pipeline_tag": "text-generation",
        "tags": tags if format == "adapter" else [*tags, "merged-lora"],
    }
    if hub_datasets:
        meta["datasets"] = hub_datasets
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {recipe.name}",
        "",
    ]
    facts = compat["adapter"]
    revision = f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""
    shape = f"rank {facts['rank']}, alpha {facts['alpha']}, on {_modules(facts['target_modules'])}"
    what = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}[variant]
    if format == "adapter":
        qlora = f", trained as QLoRA on the {recipe.quantization.method}-quantized base" if run.quantized else ""
        made = (
            f"combined from {len(manifest.get('parents') or [])} runs with `finetune merge --method "
            f"{(manifest.get('combination') or {}).get('method')}` (see *Combination*)"
            if combined
            else f"trained with {_method(run)} by `finetune`"
        )
        lines.append(f"A {what} adapter ({shape}) for `{base}`{revision}{qlora}, {made}.")
    else:
        lines.append(
            f"`{base}`{revision} with the {what} adapter of run `{recipe.name}` ({shape}, trained with "
            f"{_method(run)}) merged into its weights in {check['dtype'] if check else 'full precision'}, made with "
            "`finetune merge` and verified against base + adapter (see *Merge check*)."
        )
    if manifest.get("parent"):
        parent = manifest["parent"].get("name")
        how = (
            f"its adapter started as `{parent}`'s and holds both updates"
            if recipe.train.method != "sft"
            else f"a fresh adapter trained on `{parent}`'s base, with its LoRA settings and template"
        )
        lines += ["", f"Lineage: {' → '.join(f'`{n}`' for n in lineage(manifest, paths=False))}. This run continued "
                      f"run `{parent}`: {how}."]  # fmt: skip
    if facts["modules_to_save"]:
        lines.append(f"Fully trained modules: {', '.join(facts['modules_to_save'])}.")
    usage = _usage(format, base, recipe.model.revision, compat.get("files"), bool(manifest.get("new_tokens")))
    lines += ["", "## Use", "", "```python", *usage, "```", ""]
    if combined:
        lines += _combination_section(manifest)
    else:
        lines += _training_section(run)
    lines += _data_section(run)
    lines += _eval_section(run)
    if check is not None:
        lines += _check_section(check)
    lines += _compat_section(compat)
    lines += [
        "## Reproduce",
        "",
        "`recipe.yaml` in this directory is the fully resolved recipe (extends and --set applied):",
        "",
        "```bash",
        *(["# first train the parent run that model.from_run names"] if manifest.get("parent") else []),
        "finetune train recipe.yaml"
        if not combined
        else "# train each parent run, then: finetune merge PARENT... --method ...",
        "```",
        "",
    ]
    return "\n".join(lines)


METHOD_NAMES = {"sft": "supervised fine-tuning (SFT)", "dpo": "DPO", "kto": "KTO", "grpo": "GRPO"}


def _method(run: Run) -> str:
    return METHOD_NAMES.get(run.recipe.train.method, run.recipe.train.method)


def _modules(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def _usage(
    format: str, base: str, revision: str | None, gguf_files: dict[str, str] | None = None, new_tokens: bool = False
) -> list[str]:
    rev = f', revision="{revision}"' if revision else ""
    if format == "gguf" and gguf_files:  # see gguf.json for every file and its verification
        lines = ["from llama_cpp import Llama", "", f'model = Llama("<this directory>/{gguf_files["model"]}")']
        if "adapter" not in gguf_files:  # a run that added tokens: the merged model only
            return [*lines, "# Ollama: ollama create NAME -f Modelfile"]
        base_gguf, adapter = gguf_files["base"], gguf_files["adapter"]
        return [
            *lines,
            f'# or: Llama("<this directory>/{base_gguf}", lora_path="<this directory>/{adapter}")',
            "# Ollama: ollama create NAME -f Modelfile  (Modelfile.adapter: the base GGUF + the GGUF adapter)",
        ]
    if format == "adapter":
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}"{rev})',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")  # with the chat template used in training',
            *(
                [
                    "base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new tokens' rows are in "
                    "the adapter"
                ]
                if new_tokens
                else []
            ),
            'model = PeftModel.from_pretrained(base, "<this directory>")',
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")  # with the chat template used in training',
    ]


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    return [*out, ""]


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _loraplus(t: Any) -> str:
    ratio = t.loraplus_lr_ratio
    return f"; LoRA+: B matrices at {ratio:g} x ({t.lr * ratio:g})" if ratio else ""


def _per_layer(recipe: Any) -> bool:
    """Ranks, alphas or blocks set per layer: the card then says which modules got which (the manifest's ranks)."""
    return bool(recipe.lora.rank_pattern or recipe.lora.alpha_pattern or recipe.lora.layers is not None)


def _training_section(run: Run) -> list[str]:
    recipe, m = run.recipe, run.manifest
    t, data, lora = recipe.train, m.get("data") or {}, m.get("lora") or {}
    trainable, total = lora.get("trainable_params"), lora.get("total_params")
    share = f"{trainable:,} of {total:,} ({trainable / total:.2%})" if trainable and total else None
    q = recipe.quantization
    quant = (
        "none"
        if q.method == "none"
        else f"{q.method} (QLoRA)" + (", double quant" if q.double_quant and q.method in ("nf4", "fp4") else "")
    )
    packages = m.get("packages") or {}
    hw = m.get("hardware") or {}
    rows = [
        ("steps", _num(m.get("steps")) if m.get("steps") is not None else None),
        ("train loss (mean)", _num(m.get("train_loss")) if m.get("train_loss") is not None else None),
        ("trainable parameters", share),
        (
            "LoRA",
            f"{run.variant}, rank {recipe.lora.rank}, alpha {recipe.lora.alpha:g}, dropout {recipe.lora.dropout:g}",
        ),
        ("LoRA initialisation", _init_row(m.get("lora_init"))),
        ("quantization", quant),
        ("new tokens", _new_tokens_row(m.get("new_tokens"))),
        ("epochs / max steps", f"{t.epochs:g} / {t.max_steps or '-'}"),
        ("learning rate", f"{t.lr:g}, {t.scheduler}, warmup {t.warmup_ratio:g}" + _loraplus(t)),
        ("adapter layout", "; ".join(lora.get("ranks") or []) if _per_layer(recipe) else None),
        ("batch", f"{t.batch_size} x {t.grad_accum} accumulation, optimizer {t.optimizer}"),
        ("max sequence length", _num(data.get("max_seq_length")) if data.get("max_seq_length") else None),
        (
            "rows (train / held out)",
            f"{data['train_rows']:,} / {data.get('eval_rows', 0):,}" if "train_rows" in data else None,
        ),
        (
            "tokens (all / trained)",
            f"{data['train_tokens']:,} / {data.get('trained_tokens', 0):,}" if "train_tokens" in data else None,
        ),
        ("duration", None if (seconds := run_seconds(m)) is None else duration(seconds)),
        ("seed", recipe.seed),
        ("hardware", _hardware(hw) if hw else None),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v) or None),
        ("recipe sha256", f"`{m['recipe_sha256']}`" if m.get("recipe_sha256") else None),
        ("run status", m.get("status")),
    ]
    return ["## Training", "", *_table(rows)]


def _new_tokens_row(new: dict | None) -> str | None:
    """data.add_special_tokens: which tokens, their ids, how they were trained, the vocabulary it gave."""
    if not new:
        return None
    how = "their rows only" if new["mode"] == "trainable_rows" else "in full (modules_to_save)"
    return (f"{', '.join(f'`{t}`' for t in new['tokens'])} (ids {new['ids'][0]}-{new['ids'][-1]}), "
            f"{', '.join(new['layers'])} trained {how}; embeddings {new['embedding_rows']:,} rows")  # fmt: skip


def _init_row(init: dict | None) -> str | None:
    """`lora.init` and how the adapter relates to the original base (finetune.lora_init); None for the default."""
    if not init:
        return None
    data = init.get("data")
    read = f", from {data['rows']} training rows" if data else ""
    return f"{init['method']} ({init.get('seconds', 0):.1f} s{read}); conversion: {init['conversion']}"


def _hardware(hw: dict) -> str:
    gpus = hw.get("gpus") or []
    return f"{', '.join(gpus)}" if gpus else f"CPU ({hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores), no GPU"


def _combination_section(manifest: dict) -> list[str]:
    c = manifest.get("combination") or {}
    lines = [
        "## Combination",
        "",
        f"Combined with PEFT's `add_weighted_adapter` (method `{c.get('method')}`"
        + (f", density {c['density']}" if c.get("density") is not None else "")
        + ") from:",
        "",
        "| parent run | weight | variant | rank | adapter sha256 |",
        "|---|---|---|---|---|",
    ]
    for p in manifest.get("parents") or []:
        lines.append(
            f"| {p.get('name')} | {p.get('weight')} | {p.get('variant')} | {p.get('rank')} | `{p.get('adapter_sha256', '')[:16]}` |"
        )
    return [*lines, ""]


def _data_section(run: Run) -> list[str]:
    recorded = {s.get("path"): s for s in (run.manifest.get("data") or {}).get("sources") or []}
    lines = ["## Data", "", "| source | format | rows | sha256 |", "|---|---|---|---|"]
    for source in run.recipe.data.train:
        r = recorded.get(source.path, {})
        shown = Path(source.path).name if is_local(source.path) else source.path
        rows = r.get("rows")
        lines.append(
            f"| {shown} | {source.format} | {'' if rows is None else f'{rows:,}'} | "
            f"{'`' + r['sha256'][:16] + '`' if r.get('sha256') else ''} |"
        )
    return [*lines, ""]


def _eval_section(run: Run) -> list[str]:
    """The held-out figures, compared with the parent run where there is one (what this stage gained or lost),
    with the base beside them."""
    summary = read_summary(run.dirs)
    if summary is None:
        return ["## Evaluation", "", "No held-out evaluation was recorded for this run.", ""]
    p = summary.preference
    parent = (run.manifest.get("parent") or {}).get("name")
    if p is None or p.reference_is_base:
        what = "its base" + (" (the reference of this run, which started from the base)" if p else "")
        lines = [f"Held-out data ({summary.examples} examples), tuned against {what}:", "",
                 "| metric | base | tuned | delta |", "|---|---|---|---|"]  # fmt: skip
        for row in summary.rows():
            lines.append(f"| {_label(row.metric)} | {_cell(row.base)} | {row.tuned:.4g} | {_delta(row.delta)} |")
        return ["## Evaluation", "", *lines, ""]
    base = {row.metric: row for row in summary.rows()}
    lines = [f"Held-out data ({summary.examples} examples), tuned against its parent run `{parent}` (the reference "
             "this stage trained against), with the base beside them:", "",
             f"| metric | base | parent `{parent}` | tuned | vs parent | vs base |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary.rows("reference"):
        b = base.get(row.metric)
        lines.append(f"| {_label(row.metric)} | {_cell(b and b.base)} | {_cell(row.base)} | {row.tuned:.4g} | "
                     f"{_delta(row.delta)} | {_delta(b and b.delta)} |")  # fmt: skip
    return ["## Evaluation", "", *lines, ""]


def _label(metric: str) -> str:
    return metric.rsplit(":", 1)[-1]  # a module:function metric by its function's name, as the CLI shows it


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _delta(value: float | None) -> str:
    return "" if value is None else f"{value:+.4g}"


def _check_section(check: dict) -> list[str]:
    return [
        "## Merge check",
        "",
        f"Logits of this merged model (reloaded from disk) against base + adapter unmerged, {check['dtype']}, "
        f"{check['prompts']} prompts ({check['tokens']} tokens) from {Path(check['prompts_from']).name}: "
        f"max abs difference {check['max_abs_diff']:.3g}, max relative {check['max_rel_diff']:.3g} "
        f"(tolerance {check['tolerance']:.3g}); the adapter itself moves logits by up to {check['adapter_effect']:.3g}; "
        f"greedy tokens agree at {check['argmax_agreement']:.1%} of positions. Details: merge_check.json.",
        "",
    ]


TARGET_NAMES = {
    "transformers_peft": "transformers + PEFT",
    "transformers": "transformers",
    "vllm": "vLLM",
    "gguf": "GGUF / llama.cpp",
    "llama_cpp": "llama.cpp",
    "ollama": "Ollama",
}


def verdict_word(works: bool | None) -> str:
    return {True: "works", False: "does not work", None: "not checked"}[works]


def _compat_section(compat: dict) -> list[str]:
    lines = [
        "## Compatibility",
        "",
        "From compat.json: *works* only where a check was run on this directory, *does not work* where its files "
        "hold something the runtime refuses, *not checked* otherwise.",
        "",
    ]
    for key, v in compat["targets"].items():
        lines.append(f"- **{TARGET_NAMES.get(key, key)}**: {verdict_word(v['works'])}: {v['summary']}.")
        lines += [f"  - {reason}" for reason in v["reasons"]]
        if v.get("command"):
            lines.append(f"  - `{v['command']}`")
    return [*lines, ""]
