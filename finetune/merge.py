"""`finetune merge`: fold a run's adapter into its base model, verified (several runs: `finetune.combine`).

merge, top to bottom: open the run (`finetune.runs.open_run`: resolved recipe, manifest, adapter
checked file by file), load the base at the run's revision in full or half precision (never 4-bit:
a QLoRA adapter goes into the unquantized base, a LoftQ one into the NF4 weights dequantized) with the adapter
unmerged, record its reference
logits on held-out prompts, `merge_and_unload` and save safetensors + tokenizer + chat template +
generation config into a temporary directory, reload that directory with plain transformers and
verify its logits against the reference. Only a merge that passes is renamed into place, with
merge_check.json beside the weights.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import UserError
from finetune.files import atomic_dir, file_sha256, write_json_atomic
from finetune.machine import device, free_memory, resolve_dtype, this_machine
from finetune.modeling import fit_to_adapter, load_model, model_kwargs, quiet_libraries
from finetune.recipe.schema import Recipe
from finetune.runs import Result, Run, claim_output, now, open_run
from finetune.speed import model_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from finetune.combine import CombineResult

Progress = Callable[[str], None]

MERGE_DTYPES = ("float32", "bfloat16", "float16")

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


# --- merge ------------------------------------------------------------------------------------------


@dataclass
class MergeResult(Result):
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
        check, notes = merge_into(run, tmp, dtype_name, progress or (lambda _: None))
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


def merge_runs(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    dtype: str | None = None,
    method: str | None = None,
    weights: list[float] | None = None,
    density: float | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult | CombineResult:
    """`finetune merge`: one run is merged into its base; several (or any `method`) are combined into one adapter."""
    if len(run_dirs) > 1 or method is not None:
        if method is None:
            raise UserError(
                "several run directories: choose how to combine them with "
                "--method linear|ties|dare_linear|dare_ties|cat|svd"
            )
        if dtype is not None:
            raise UserError("--dtype applies to merging into the base; combining writes an adapter (merge it after)")
        from finetune.combine import combine

        return combine(run_dirs, method, weights, density, out, overwrite=overwrite, progress=progress)
    if weights is not None or density is not None:
        raise UserError("--weights and --density apply only when combining several runs with --method")
    return merge(run_dirs[0], out, dtype, overwrite=overwrite, progress=progress)


def merge_dtype(recipe: Recipe, requested: str | None) -> str:
    """The dtype to merge in: as asked, else the recipe's model.dtype, whose `auto` means what it means in training
    (`finetune.machine.resolve_dtype`: bfloat16 or float16 on a GPU, float32 on the CPU)."""
    if requested is not None:
        if requested not in MERGE_DTYPES:
            raise UserError(f"--dtype: must be one of {', '.join(MERGE_DTYPES)} (got {requested!r}); never 4-bit")
        return requested
    return str(resolve_dtype(recipe.model.dtype)).removeprefix("torch.")


def merge_into(run: Run, out: Path, dtype_name: str, progress: Progress = lambda _: None) -> tuple[dict, list[str]]:
    """Merge into `out` (a fresh directory) and verify the saved model; raise MergeCheckError on a mismatch.

    Returns the check (also written to out/merge_check.json) and notes for the user.
    """
    from transformers import AutoTokenizer

    quiet_libraries()
    recipe = _with_dtype(run.recipe, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    prompts, source = check_prompts(run, tokenizer)
    batches = [_encode(tokenizer, p) for p in prompts]
    progress(f"loading {recipe.model.base} in {dtype_name} with the adapter (unmerged)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=r".*no longer tied after merging.*")
        model, tied = _load_unmerged(run, recipe)
        reference, effect = _reference_logits(model, batches)
        progress("merging and saving the merged model")
        in_memory, untied = _merge_and_save(model, tokenizer, batches, out)
    del model
    free_memory()
    progress("verifying: reloading the saved model with plain transformers")
    check = _verify(run, recipe, out, tokenizer, batches, reference, in_memory, effect)
    check["prompts_from"] = source
    if not check["passed"]:
        raise MergeCheckError(
            f"merge check failed: the merged model's logits differ from base + adapter by up to "
            f"{check['max_abs_diff']:.3g} (relative {check['max_rel_diff']:.3g}), above the {dtype_name} tolerance "
            f"{check['tolerance']:.3g}; nothing was written",
            check,
        )
    write_json_atomic(out / "merge_check.json", check)
    return check, _merge_notes(run, dtype_name, tied and untied, effect, check["tolerance"])


def _load_unmerged(run: Run, recipe: Recipe) -> tuple[Any, bool]:
    """The base (never quantized) with the run's adapter applied unmerged; whether its embeddings were tied.

    The base is the original weights, except for a LoftQ run: its adapter is relative to the NF4 base (B0 A0 starts
    at W - NF4(W)), so it goes into the NF4 weights dequantized (in the merge dtype): the base it was trained on."""
    from peft import PeftModel

    attention = model_attention(recipe, this_machine())
    if run.recipe.lora.init.on_quantized_base:
        base = load_model(recipe, attention, quantized=True).dequantize(dtype=resolve_dtype(recipe.model.dtype))
    else:
        base = load_model(recipe, attention, quantized=False)
    tied = _tied(base)
    fit_to_adapter(base, run.adapter)  # a run that added tokens: the merged model keeps the grown vocabulary
    model = PeftModel.from_pretrained(base, str(run.adapter), is_trainable=False)
    model.eval()
    return model, tied


def _reference_logits(model: Any, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Base + adapter's logits, and how far the adapter moves them (with it disabled: the base's)."""
    reference = _logits(model, batches)
    with model.disable_adapter():
        effect = max(float((b - r).abs().max()) for b, r in zip(_logits(model, batches), reference, strict=True))
    return reference, effect


def _merge_and_save(
    model: Any, tokenizer: PreTrainedTokenizerBase, batches: list[torch.Tensor], out: Path
) -> tuple[list[torch.Tensor], bool]:
    """`merge_and_unload`, then save with the tokenizer; the merged model's logits in memory, and whether the
    output layer had to be untied from the input embeddings."""
    merged = model.merge_and_unload(safe_merge=True)
    untied = _untie_if_diverged(merged)
    in_memory = _logits(merged, batches)
    _set_generation_config(merged, tokenizer)
    merged.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    return in_memory, untied


def _verify(
    run: Run,
    recipe: Recipe,
    out: Path,
    tokenizer: PreTrainedTokenizerBase,
    batches: list[torch.Tensor],
    reference: list[torch.Tensor],
    in_memory: list[torch.Tensor],
    effect: float,
) -> dict[str, Any]:
    """Reload the saved model with plain transformers; compare its logits (and the in-memory merged model's)
    with the reference. The check as merge_check.json records it."""
    from transformers import AutoModelForCausalLM

    kwargs = model_kwargs(recipe, model_attention(recipe, this_machine()))
    reloaded = AutoModelForCausalLM.from_pretrained(out, **kwargs).to(device())
    saved = _logits(reloaded, batches)
    del reloaded
    free_memory()
    _check_tokenizer(out, tokenizer)
    check = compare_logits(reference, saved, recipe.model.dtype, effect)
    memory = compare_logits(reference, in_memory, recipe.model.dtype, effect)
    check.update(
        prompts=len(batches),
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
        base_weights=f"{recipe.quantization.method} dequantized" if recipe.lora.init.on_quantized_base else "original",
        created=now(),
    )
    check["passed"] = check["passed"] and memory["passed"]
    return check


def _merge_notes(run: Run, dtype_name: str, untied: bool, effect: float, tolerance: float) -> list[str]:
    notes = []
    if run.recipe.lora.init.on_quantized_base:
        notes.append(
            f"LoftQ adapter: merged into the {run.recipe.quantization.method} base weights dequantized to {dtype_name} "
            "(the base it was trained on; its start B0 A0 is that base's quantization error, so the original weights "
            "would count that error twice)"
        )
    elif run.quantized:
        notes.append(
            f"QLoRA adapter (trained on a {run.recipe.quantization.method}-quantized base): merged into the base "
            f"loaded in {dtype_name} (its original weights), never into 4-bit ones. The result equals base + adapter "
            f"in {dtype_name}, as transformers + PEFT and vLLM serve it, and differs slightly from the 4-bit model "
            "evaluated in training."
        )
    if untied:
        notes.append(
            "input and output embeddings were tied in the base; the adapter trains the output layer on its own "
            "(modules_to_save), so the merged model stores them separately (tie_word_embeddings: false)"
        )
    if effect <= tolerance:
        notes.append(
            f"the adapter moves the logits by at most {effect:.3g}, within the tolerance {tolerance:.3g}: "
            "this check cannot tell the merged model from the base"
        )
    return notes


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
    from finetune.generation import stop_ids

    gen = model.generation_config
    ids = stop_ids(gen, tokenizer)
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _check_tokenizer(out: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    if saved.chat_template != tokenizer.chat_template or len(saved) != len(tokenizer):
        raise RuntimeError(f"the tokenizer saved in {out} does not reload with the run's chat template and vocabulary")
