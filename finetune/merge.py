"""`finetune merge`: fold a run's adapter into its base model, verified; combine several adapters into one.

merge, top to bottom: open the run (resolved recipe, manifest, adapter checked file by file),
load the base at the run's revision in full or half precision (never 4-bit: a QLoRA adapter
goes into the unquantized base), apply the adapter unmerged and record its logits on held-out
prompts, `merge_and_unload`, save safetensors + tokenizer + chat template + generation config
into a temporary directory, reload that directory with plain transformers and compare its
logits with the unmerged ones. Only a merge that passes is renamed into place, with
merge_check.json beside the weights.

combine: several adapters trained on the same base (same id, revision and target modules)
become one standard PEFT adapter through PEFT's `add_weighted_adapter`, in a directory laid
out like a run (recipe.yaml, manifest.json naming the parents, adapter/), so that
`finetune merge` and `finetune export` take it like any run.
"""

from __future__ import annotations

import gc
import json
import math
import re
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import RunDirError, UserError
from finetune.loading import load_recipe
from finetune.modeling import device, hub_kwargs, load_model, quiet_libraries
from finetune.recipe import NAME_PATTERN, Recipe
from finetune.runs import RunDir, atomic_dir, file_sha256, hardware, now, package_versions, write_json_atomic
from finetune.secrets import redact
from finetune.yaml_source import dump

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str], None]

MERGE_DTYPES = ("float32", "bfloat16", "float16")
COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "cat", "svd")
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5

# A merge passes when max|merged - unmerged| <= atol + rtol * max|unmerged| over every logit of the
# check prompts. Measured on the CPU (llama-architecture models of 2-32 layers, hidden 64-1024,
# logits up to 55, LoRA and DoRA updates of trained size; merged vs unmerged in the same dtype):
#   float32   relative 3e-7 .. 1.6e-6; absolute 2e-7 (the tiny test models) .. 8.8e-5 (32 layers, logits 55)
#   float16   relative 5.8e-4 .. 3.4e-3, the same size as float16 vs float32 for the unmerged model itself
#   bfloat16  relative 4.5e-3 .. 2.7e-2, likewise the size of bfloat16 vs float32 (one bf16 ulp is 7.8e-3)
# A half-precision merge cannot be checked more tightly than half-precision arithmetic allows, so
# its bound is ~4x the largest measured difference. float32 keeps the 1e-5 absolute bound that small
# models meet, plus 1e-5 relative so that deep models with large logits (8.8e-5 absolute) pass.
# A wrong merge (adapter missing, scaled wrongly, a module not saved) moves logits by about the
# adapter's own effect, reported as `adapter_effect` (about 1 on the test models, 16 on the 32-layer
# one): orders of magnitude above these bounds.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-5),
    "float16": (0.0, 1.5e-2),
    "bfloat16": (0.0, 1e-1),
}
CHECK_PROMPTS = 8
CHECK_TOKENS = 128  # the last tokens of each prompt (where the generation prompt is)
FIXED_CONVERSATIONS = (
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "List three colours, separated by commas."}],
    [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Now say goodbye."},
    ],
)


class MergeCheckError(RuntimeError):
    """The merged model's logits differ from base + adapter beyond the tolerance: exit 1, nothing written."""

    exit_code = 1

    def __init__(self, message: str, check: dict[str, Any]):
        super().__init__(message)
        self.check = check


# --- reading a run directory --------------------------------------------------------------------


@dataclass
class Run:
    """A run directory opened for merging or export: its recipe, manifest and checked adapter."""

    root: Path
    recipe: Recipe
    manifest: dict[str, Any]
    adapter_config: dict[str, Any]
    tensors: dict[str, list[int]]  # adapter tensor name -> shape
    notes: list[str] = field(default_factory=list)

    @property
    def dirs(self) -> RunDir:
        return RunDir(self.root)

    @property
    def adapter(self) -> Path:
        return self.dirs.adapter

    @property
    def quantized(self) -> bool:
        return self.recipe.quantization.method != "none"

    @property
    def variant(self) -> str:
        if self.adapter_config.get("use_dora"):
            return "dora"
        return "rslora" if self.adapter_config.get("use_rslora") else "lora"


def open_run(run_dir: str | Path) -> Run:
    """Read a run directory's resolved recipe, manifest and adapter; refuse what cannot be merged or exported."""
    root = Path(run_dir).expanduser().resolve()
    run = RunDir(root)
    if not root.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not run.recipe.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml); give the directory `finetune train` wrote")
    recipe = load_recipe(run.recipe, check_files=False)
    manifest: dict[str, Any] = {}
    notes: list[str] = []
    if run.manifest.is_file():
        try:
            manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{run.manifest}: unreadable manifest ({e})") from None
    status = manifest.get("status")
    if status == "running":
        raise UserError(
            f"{run_dir}: the manifest says 'running': the run is still training, or was killed before it could "
            "record its end (finish it with finetune train --resume); its adapter may still change"
        )
    if status not in (None, "completed"):
        notes.append(f"the run's manifest says {status!r}, not 'completed'; its saved adapter is used as it is")
    if manifest.get("parent"):  # a preference run continued its parent's adapter: one adapter holds both updates
        notes.append(
            f"this run continued {manifest['parent']['name']} ({manifest['parent']['path']}): its adapter started as "
            "that run's and holds both updates, so the merged model is base + SFT + preference in one"
        )
    config, tensors = check_adapter(run.adapter)
    base = recipe.model.base
    if _looks_like_path(base) and not Path(base).exists():
        raise UserError(f"{run.recipe}: model.base {base} does not exist (the base model this adapter was trained on)")
    return Run(root, recipe, manifest, config, tensors, notes)


def check_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The adapter's config and tensor shapes; a missing, empty, truncated or unreadable file is a UserError."""
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no adapter directory (did training finish?)")
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing adapter config")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: unreadable adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UserError(f"{config_path}: not a LoRA adapter (peft_type {kind!r}); only LoRA adapters are supported")
    if not weights.is_file():
        extra = (
            " (adapter_model.bin is there: only safetensors adapters are read)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise UserError(f"{weights}: missing adapter weights{extra}")
    tensors = _safetensors_shapes(weights)
    if not tensors:
        raise UserError(f"{weights}: the adapter holds no tensors")
    if not any(".lora_A." in name or ".lora_embedding_A" in name for name in tensors):
        raise UserError(f"{weights}: no LoRA tensors (lora_A/lora_B) in the adapter")
    return config, tensors


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a mapping of tensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # validates offsets, dtypes and coverage
            names = list(f.keys())
    except Exception as e:  # struct.error, ValueError, SafetensorError: all mean an unusable file
        raise UserError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, the header describes {8 + length + end})")
    return {name: list(header[name]["shape"]) for name in names}


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


# --- merge ------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    run_dir: str
    out_dir: str
    base: str
    revision: str | None
    dtype: str
    variant: str
    rank: int
    quantization: str  # how the base was quantized in training; the merge itself never is
    check: dict[str, Any]
    files: list[str]
    size_bytes: int
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    run_dir: str | Path,
    out: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the run's adapter into its base; write RUN_DIR/merged (or `out`) only if the logits check passes."""
    started = time.perf_counter()
    run = open_run(run_dir)
    target = Path(out).expanduser().resolve() if out else run.root / "merged"
    claim_output(target, overwrite, run)
    dtype_name = merge_dtype(run.recipe, dtype)
    with atomic_dir(target) as tmp:
        check, notes = merge_into(run, tmp, dtype_name, progress or _quiet)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    return MergeResult(
        run_dir=str(run.root),
        out_dir=str(target),
        base=run.recipe.model.base,
        revision=run.recipe.model.revision,
        dtype=dtype_name,
        variant=run.variant,
        rank=int(run.adapter_config.get("r", 0)),
        quantization=run.recipe.quantization.method,
        check=check,
        files=files,
        size_bytes=sum((target / f).stat().st_size for f in files),
        seconds=time.perf_counter() - started,
        notes=run.notes + notes,
    )


def claim_output(target: Path, overwrite: bool, run: Run | None = None) -> None:
    """Refuse an existing output directory unless `overwrite`, and outputs that would clobber a run's own files."""
    if run is not None and (
        target == run.root or run.root.is_relative_to(target) or target.is_relative_to(run.adapter)
    ):
        raise UserError(f"--out {target}: would overwrite the run itself; choose a directory outside {run.adapter}")
    if target.exists() and not target.is_dir():
        raise RunDirError(f"{target} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RunDirError(f"{target} already exists; pass --overwrite to replace it (or choose another --out)")


def merge_dtype(recipe: Recipe, requested: str | None) -> str:
    """The dtype to merge in: as asked, else the recipe's model.dtype; `auto` keeps the base checkpoint's own dtype."""
    if requested is not None:
        if requested not in MERGE_DTYPES:
            raise UserError(f"--dtype: must be one of {', '.join(MERGE_DTYPES)} (got {requested!r}); never 4-bit")
        return requested
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(recipe.model.base, **hub_kwargs(recipe))
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return name if name in MERGE_DTYPES else "float32"


def merge_into(run: Run, out: Path, dtype_name: str, progress: Progress = lambda _: None) -> tuple[dict, list[str]]:
    """Merge into `out` (a fresh directory) and verify the saved model; raise MergeCheckError on a mismatch.

    Returns the check (also written to out/merge_check.json) and notes for the user.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    quiet_libraries()
    notes: list[str] = []
    recipe = run.recipe
    if run.quantized:
        notes.append(
            f"QLoRA adapter (trained on a {recipe.quantization.method}-quantized base): merged into the base loaded "
            f"in {dtype_name} (its original weights), never into 4-bit ones. The result equals base + adapter in "
            f"{dtype_name}, as transformers + PEFT and vLLM serve it, and differs slightly from the 4-bit model "
            "evaluated in training."
        )
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    prompts, source = check_prompts(run, tokenizer)
    batches = [_encode(tokenizer, p) for p in prompts]

    progress(f"loading {recipe.model.base} in {dtype_name} with the adapter (unmerged)")
    base = load_model(_with_dtype(recipe, dtype_name), quantized=False)
    tied_before = _tied(base)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=r".*no longer tied after merging.*")
        model = PeftModel.from_pretrained(base, str(run.adapter), is_trainable=False)
        model.eval()
        reference = _logits(model, batches)
        with model.disable_adapter():
            effect = max(float((b - r).abs().max()) for b, r in zip(_logits(model, batches), reference, strict=True))
        progress("merging")
        merged = model.merge_and_unload(safe_merge=True)
    untied = _untie_if_diverged(merged)
    if tied_before and untied:
        notes.append(
            "input and output embeddings were tied in the base; the adapter trains the output layer on its own "
            "(modules_to_save), so the merged model stores them separately (tie_word_embeddings: false)"
        )
    in_memory = _logits(merged, batches)
    _set_generation_config(merged, tokenizer)
    progress("saving the merged model")
    merged.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    del model, merged, base
    _free_memory()

    progress("verifying: reloading the saved model with plain transformers")
    reloaded = _load_saved(out, recipe, dtype_name)
    saved = _logits(reloaded, batches)
    del reloaded
    _free_memory()
    _check_tokenizer(out, tokenizer)

    check = compare_logits(reference, saved, dtype_name, effect)
    memory = compare_logits(reference, in_memory, dtype_name, effect)
    check.update(
        prompts=len(batches),
        prompts_from=source,
        tokens=sum(int(b.shape[1]) for b in batches),
        in_memory_max_abs_diff=memory["max_abs_diff"],
        compared="the saved merged model (reloaded with AutoModelForCausalLM) against base + adapter "
        "(PeftModel, unmerged), same dtype, same prompts",
        run_dir=str(run.root),
        base={"id": recipe.model.base, "revision": recipe.model.revision},
        adapter={
            "variant": run.variant,
            "rank": run.adapter_config.get("r"),
            "sha256": file_sha256(run.adapter / "adapter_model.safetensors"),
        },
        quantization_in_training=recipe.quantization.method,
        created=now(),
    )
    check["passed"] = check["passed"] and memory["passed"]
    if effect <= check["tolerance"]:
        notes.append(
            f"the adapter moves the logits by at most {effect:.3g}, within the tolerance {check['tolerance']:.3g}: "
            "this check cannot tell the merged model from the base"
        )
    if not check["passed"]:
        raise MergeCheckError(
            f"merge check failed: the merged model's logits differ from base + adapter by up to "
            f"{check['max_abs_diff']:.3g} (relative {check['max_rel_diff']:.3g}), above the {dtype_name} tolerance "
            f"{check['tolerance']:.3g}; nothing was written",
            check,
        )
    write_json_atomic(out / "merge_check.json", check)
    return check, notes


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor], dtype_name: str, effect: float) -> dict:
    """Max abs and relative (to the largest reference logit) difference, greedy agreement, pass/fail."""
    atol, rtol = TOLERANCES[dtype_name]
    max_abs = max(float((m - r).abs().max()) for m, r in zip(merged, reference, strict=True))
    scale = max(float(r.abs().max()) for r in reference)
    agree = sum(int((m.argmax(-1) == r.argmax(-1)).sum()) for m, r in zip(merged, reference, strict=True))
    positions = sum(r.shape[0] * r.shape[1] for r in reference)
    bound = atol + rtol * scale
    finite = all(bool(torch.isfinite(m).all()) for m in merged)
    return {
        "passed": finite and max_abs <= bound,
        "dtype": dtype_name,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / scale if scale else 0.0,
        "max_abs_logit": scale,
        "tolerance": bound,
        "atol": atol,
        "rtol": rtol,
        "adapter_effect": effect,
        "argmax_agreement": agree / max(positions, 1),
    }


def check_prompts(run: Run, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], str]:
    """Held-out prompts from eval/examples.jsonl, else a few fixed conversations rendered by the chat template."""
    examples = run.dirs.eval / "examples.jsonl"
    prompts: list[str] = []
    if examples.is_file():
        for line in examples.read_text(encoding="utf-8").splitlines():
            try:
                prompt = json.loads(line).get("prompt")
            except (ValueError, AttributeError):
                continue
            if isinstance(prompt, str) and prompt:
                prompts.append(prompt)
            if len(prompts) == CHECK_PROMPTS:
                break
    if prompts:
        return prompts, str(examples)
    from finetune.data.templates import render

    for messages in FIXED_CONVERSATIONS:
        try:
            prompts.append(render(tokenizer, messages, generation_prompt=True))
        except Exception:  # a template that refuses a conversation shape (some reject system turns)
            continue
    if not prompts:
        prompts = [m[-1]["content"] for m in FIXED_CONVERSATIONS]
        return prompts, "fixed prompts (plain text: the chat template rendered none of them)"
    return prompts, "fixed prompts rendered by the run's chat template"


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-CHECK_TOKENS:] or [tokenizer.eos_token_id or 0]
    return torch.tensor([ids])


@torch.no_grad()
def _logits(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    where = next(model.parameters()).device
    return [model(input_ids=ids.to(where)).logits.float().cpu() for ids in batches]


def _with_dtype(recipe: Recipe, dtype_name: str) -> Recipe:
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": dtype_name})})


def _tied(model: PreTrainedModel) -> bool:
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    return outp is not None and inp.weight is outp.weight


def _untie_if_diverged(model: PreTrainedModel) -> bool:
    """After merging, output and input embeddings that differ must not be saved as tied; True if they differ."""
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is None or inp.weight is outp.weight:
        return False
    if inp.weight.shape == outp.weight.shape and torch.equal(inp.weight, outp.weight):
        return False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return True


def _set_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Stop at the chat template's end-of-turn token, as evaluation did with base + adapter."""
    gen = model.generation_config
    eos = gen.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _load_saved(out: Path, recipe: Recipe, dtype_name: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    from finetune.speed import attention

    model = AutoModelForCausalLM.from_pretrained(
        out,
        dtype=getattr(torch, dtype_name),
        attn_implementation=attention(recipe),
        use_safetensors=True,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    return model.to(device())


def _check_tokenizer(out: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    if saved.chat_template != tokenizer.chat_template or len(saved) != len(tokenizer):
        raise RuntimeError(f"the tokenizer saved in {out} does not reload with the run's chat template and vocabulary")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet(_: str) -> None:
    pass


# --- combine ------------------------------------------------------------------------------------------


@dataclass
class CombineResult:
    out_dir: str
    adapter_dir: str
    method: str
    weights: list[float]
    density: float | None
    rank: int
    targets: list[str]
    parents: list[str]
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combine(
    run_dirs: list[str | Path],
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CombineResult:
    """Combine adapters trained on the same base into one PEFT adapter, in a run-like directory at `out`."""
    started, started_at = time.perf_counter(), now()
    progress = progress or _quiet
    if len(run_dirs) < 2:
        raise UserError("combining needs two or more run directories")
    if method not in COMBINE_METHODS:
        raise UserError(f"--method: must be one of {', '.join(COMBINE_METHODS)} (got {method!r})")
    if out is None:
        raise UserError("--out is required when combining adapters: the directory for the combined adapter")
    weights = _combine_weights(weights, len(run_dirs))
    density = _combine_density(method, density)
    runs = [open_run(d) for d in run_dirs]
    targets, rank = _check_compatible(runs, method)
    target = Path(out).expanduser().resolve()
    for run in runs:
        claim_output(target, overwrite, run)
    notes = _combine_notes(runs)
    seed = runs[0].recipe.seed
    with atomic_dir(target) as tmp:
        progress(f"loading {runs[0].recipe.model.base} with {len(runs)} adapters")
        recipe_data = _combined_recipe(runs, target, rank, targets)
        _write_combined_adapter(runs, tmp / "adapter", method, weights, density, seed)
        (tmp / "recipe.yaml").write_text(
            f"# Resolved recipe of the adapter combined ({method}) from: {', '.join(str(r.root) for r in runs)}\n"
            + dump(redact(recipe_data)),
            encoding="utf-8",
        )
        recipe = load_recipe(tmp / "recipe.yaml", check_files=False)  # the combined directory must work like a run
        check_adapter(tmp / "adapter")
        write_json_atomic(
            tmp / "manifest.json",
            redact(
                {
                    "name": recipe.name,
                    "kind": "combined",
                    "status": "completed",
                    "started": started_at,
                    "finished": now(),
                    "recipe_sha256": recipe.fingerprint(),
                    "seed": seed,
                    "base_model": {"id": recipe.model.base, "revision": recipe.model.revision},
                    "combination": {
                        "method": method,
                        "peft_combination_type": method,
                        "weights": weights,
                        "density": density,
                        "exact_weighted_sum": method == "cat",  # the others approximate sum(w_i * delta_i)
                    },
                    "parents": [
                        {
                            "run_dir": str(r.root),
                            "name": r.recipe.name,
                            "recipe_sha256": r.manifest.get("recipe_sha256") or r.recipe.fingerprint(),
                            "adapter_sha256": file_sha256(r.adapter / "adapter_model.safetensors"),
                            "variant": r.variant,
                            "rank": r.adapter_config.get("r"),
                            "weight": w,
                        }
                        for r, w in zip(runs, weights, strict=True)
                    ],
                    "lora": {"targets": targets, "rank": recipe.lora.rank},
                    "packages": package_versions(),
                    "hardware": hardware(),
                }
            ),
        )
    return CombineResult(
        out_dir=str(target),
        adapter_dir=str(target / "adapter"),
        method=method,
        weights=weights,
        density=density,
        rank=recipe.lora.rank,
        targets=targets,
        parents=[str(r.root) for r in runs],
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _combine_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weights: {len(weights)} weight(s) for {n} adapters; give one per run directory")
    if not all(math.isfinite(w) for w in weights):
        raise UserError("--weights: every weight must be a finite number")
    return [float(w) for w in weights]


def _combine_density(method: str, density: float | None) -> float | None:
    if method not in DENSITY_METHODS:
        if density is not None:
            raise UserError(f"--density: only applies to {', '.join(DENSITY_METHODS)}, not {method}")
        return None
    density = DEFAULT_DENSITY if density is None else density
    if not 0 < density <= 1:
        raise UserError(f"--density: must be > 0 and ≤ 1 (got {density})")
    return density


def _targets(config: dict[str, Any]) -> list[str] | str:
    targets = config.get("target_modules")
    return targets if isinstance(targets, str) else sorted(targets or [])


def _check_compatible(runs: list[Run], method: str) -> tuple[list[str], int]:
    """Same base (id and revision), same target modules, no DoRA or modules_to_save, equal ranks where needed."""
    first = runs[0]
    problems = []
    for run in runs[1:]:
        a, b = first.recipe.model, run.recipe.model
        if (a.base, a.revision) != (b.base, b.revision):
            problems.append(
                f"base model differs: {first.root} was trained on {a.base} (revision {a.revision}), "
                f"{run.root} on {b.base} (revision {b.revision})"
            )
        if _targets(first.adapter_config) != _targets(run.adapter_config):
            problems.append(
                f"target modules differ: {first.root} adapts {_targets(first.adapter_config)}, "
                f"{run.root} adapts {_targets(run.adapter_config)}"
            )
    for run in runs:
        if run.adapter_config.get("use_dora"):
            problems.append(
                f"{run.root} is a DoRA adapter: PEFT's add_weighted_adapter combines only the low-rank matrices, "
                "not DoRA's magnitude vectors; merge each DoRA run on its own instead"
            )
        if run.adapter_config.get("modules_to_save"):
            problems.append(
                f"{run.root} trains whole modules ({', '.join(run.adapter_config['modules_to_save'])}, "
                "modules_to_save), which cannot be combined by weighting low-rank matrices"
            )
        if run.adapter_config.get("rank_pattern") or run.adapter_config.get("alpha_pattern"):
            problems.append(f"{run.root} uses per-module ranks (rank_pattern/alpha_pattern), not supported here")
    ranks = [int(r.adapter_config.get("r", 0)) for r in runs]
    if method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        listed = ", ".join(f"{r.root}: {k}" for r, k in zip(runs, ranks, strict=True))
        problems.append(f"--method {method} needs equal ranks, got {listed}; use cat or svd for different ranks")
    if problems:
        raise UserError(problems)
    targets = _targets(first.adapter_config)
    if isinstance(targets, str):
        raise UserError(f"{first.adapter}: target_modules is a regular expression ({targets!r}); give a module list")
    rank = sum(ranks) if method == "cat" else max(ranks)
    return targets, rank


def _combine_notes(runs: list[Run]) -> list[str]:
    notes = []
    templates = {
        (r.adapter / "chat_template.jinja").read_text(encoding="utf-8")
        if (r.adapter / "chat_template.jinja").is_file()
        else None
        for r in runs
    }
    if len(templates) > 1:
        notes.append(
            f"the runs were trained with different chat templates; the combined adapter keeps {runs[0].root}'s"
        )
    if len({r.recipe.quantization.method for r in runs}) > 1:
        notes.append("some parents were trained on a quantized base and some not; the combination applies to the base")
    return notes


def _write_combined_adapter(
    runs: list[Run], out: Path, method: str, weights: list[float], density: float | None, seed: int
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    quiet_libraries()
    recipe = runs[0].recipe
    base = load_model(_with_dtype(recipe, merge_dtype(recipe, None)), quantized=False)
    names = [f"parent{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0].adapter), adapter_name=names[0], is_trainable=False)
    for name, run in zip(names[1:], runs[1:], strict=True):
        model.load_adapter(str(run.adapter), adapter_name=name, is_trainable=False)
    torch.manual_seed(seed)  # dare_* prune at random
    model.add_weighted_adapter(names, weights, "default", combination_type=method, density=density)
    # PEFT gives the new adapter lora_alpha = r with the first parent's scaling rule; the parents' scalings are
    # already folded into its matrices, so the combined adapter must be applied with scaling exactly 1.
    config = model.peft_config["default"]
    config.use_rslora = False
    config.lora_alpha = config.r
    config.inference_mode = True
    model.save_pretrained(str(out), selected_adapters=["default"])
    AutoTokenizer.from_pretrained(runs[0].adapter).save_pretrained(out)
    del model, base
    _free_memory()


def _combined_recipe(runs: list[Run], target: Path, rank: int, targets: list[str]) -> dict[str, Any]:
    """The first parent's resolved recipe, renamed, with the combined adapter's shape and every parent's data."""
    data = runs[0].recipe.resolved()
    name = target.name if re.fullmatch(NAME_PATTERN, target.name) else "combined"
    sources: list[dict] = []
    for run in runs:
        for source in run.recipe.resolved()["data"]["train"]:
            if source not in sources:
                sources.append(source)
    data["name"] = name
    data["output_dir"] = str(target)
    data["lora"].update(rank=rank, alpha=float(rank), variant="lora", targets=targets, modules_to_save=[])
    data["data"]["train"] = sources
    return data
