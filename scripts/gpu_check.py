"""The GPU check: speed and memory of `finetune train` on an 8B-shaped model, in one command, offline.

    python scripts/gpu_check.py                      # one CUDA GPU: < 8 min on an H100/H200; writes gpu-check/
    python scripts/gpu_check.py --cpu --out /tmp/gc  # tiny shapes on the CPU: the same code path, in CI

Builds a Llama model from the config shipped in the repo (tests/support/fixtures/configs/llama-3.1-8b) with random
weights (figures about speed and memory, not quality; the quickstart's tokenizer stands in, its ids are a
subset of the vocabulary), writes rows of 256 to 2048 tokens, and runs each case below in a fresh process
for a few optimizer steps:

  lora-bf16 / qlora-nf4      `finetune train` with TRL's settings (random padded batches, checkpointing
                             on, sdpa) and the plain TRL script on the same workload: tokens/s after the first
                             step, its ratio, MFU, peak memory (torch.cuda.max_memory_allocated) next to
                             `finetune plan`'s estimate
  defaults                   `finetune train` with every speed setting left `auto` (what a user gets)
  flash-attention,           each fast path alone on the lora-bf16 case; a case whose package is missing
  padding-free, packing,     (flash-attn, liger-kernel, deepspeed) or that needs a GPU is skipped, with the
  liger, paged-adamw-8bit,   reason, never silently dropped
  deepspeed-zero2

Writes gpu-check.json (every figure, the machine, package versions) and gpu-check.md (one table) into --out.
Cases are run in the order above until --budget-s is spent; the rest are listed as skipped for time.
MFU counts model FLOPs only (frozen base: 4N + 2Vh per token, no recomputation) against the GPU's dense
bf16 peak (plan.GPU_TFLOPS); tokens are the rows' real tokens, padding excluded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the plain TRL script and the per-run measurement, shared with scripts/bench.py

ROOT = bench.ROOT
CONFIG = ROOT / "tests/support/fixtures/configs/llama-3.1-8b/config.json"
TOKENIZER = ROOT / "assets/quickstart/model"
SAME = [
    "data.packing=false",
    "data.padding_free=false",
    "data.group_by_length=false",
    "train.gradient_checkpointing=true",
    "model.attn_implementation=sdpa",
    "train.liger_kernel=false",
]  # fmt: skip  (TRL's settings)
FLASH = "model.attn_implementation=flash_attention_2"


def settings(*changes: str) -> list[str]:
    """TRL's settings with some keys changed."""
    changed = {c.split("=")[0] for c in changes}
    return [s for s in SAME if s.split("=")[0] not in changed] + list(changes)


# name: (finetune overrides, plain TRL settings or None, what it needs: "cuda" and/or packages)
CASES: dict[str, tuple[list[str], dict | None, tuple[str, ...]]] = {
    "lora-bf16": (SAME, {"gradient_checkpointing": True}, ()),
    "qlora-nf4": (settings("quantization.method=nf4"), {"gradient_checkpointing": True, "nf4": True}, ()),
    "defaults": ([], None, ()),
    "flash-attention": (settings(FLASH), None, ("cuda", "flash_attn")),
    "padding-free": (settings(FLASH, "data.padding_free=true"), None, ("cuda", "flash_attn")),
    "packing": (settings(FLASH, "data.packing=true"), None, ("cuda", "flash_attn")),
    "liger": (settings("train.liger_kernel=true"), None, ("cuda", "liger_kernel")),
    "paged-adamw-8bit": (settings("train.optimizer=paged_adamw_8bit"), None, ("cuda",)),
    "deepspeed-zero2": (SAME, None, ("cuda", "deepspeed")),
}
PEAK = """import atexit, json, os, torch
def _peak():
    if torch.cuda.is_available():
        with open(os.environ["GPU_CHECK_PEAK"], "w") as fh:
            json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated()}, fh)
atexit.register(_peak)
"""
FINETUNE = PEAK + "from finetune.cli import app\napp()\n"  # `finetune` in-process, its peak written at exit


def build_model(folder: Path, cpu: bool) -> Path:
    """A random-weight Llama of the shipped 8B config (tiny shapes with --cpu), with the quickstart tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(CONFIG.parent)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if cpu:
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 3072})  # fmt: skip
    dtype = torch.float32 if cpu else torch.bfloat16
    with torch.device("cpu" if cpu else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    del model
    return folder / "model"


def rows(path: Path, n: int, max_words: int) -> Path:
    """Reverse-the-list rows of 30..max_words words: about 256 to 2048 tokens at the default 500."""
    words = bench.quickstart_words()
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(n):
            picked = rng.choices(words, k=rng.randint(max(1, max_words // 16), max_words))
            chat = [{"role": "user", "content": "Reverse the list: " + ", ".join(picked)},
                    {"role": "assistant", "content": ", ".join(reversed(picked))}]  # fmt: skip
            fh.write(json.dumps({"messages": chat}) + "\n")
    return path


def missing(needs: tuple[str, ...]) -> str | None:
    """Why a case cannot run here, or None."""
    import torch

    if "cuda" in needs and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    absent = [p for p in needs if p != "cuda" and importlib.util.find_spec(p) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def run_case(name: str, workload: dict, folder: Path, cpu: bool) -> dict:
    """finetune (and the plain TRL script where the case has one): tokens/s, peak memory, plan's estimate."""
    overrides, trl_settings, _ = CASES[name]
    out: dict = {"overrides": overrides}
    (folder / "ft").mkdir(parents=True, exist_ok=True)
    command, metrics = bench.finetune_recipe(workload, overrides, folder / "ft")
    wrapper = folder / "ft" / "finetune_peak.py"
    wrapper.write_text(FINETUNE)
    command = [sys.executable, str(wrapper), *command[3:]]  # python -m finetune.cli ARGS -> python wrapper ARGS
    if name == "deepspeed-zero2":
        config = ROOT / "configs/accelerate/deepspeed-zero2.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "1", *command[1:]]  # fmt: skip
    out["finetune"] = measured(command, metrics, folder / "ft" / "peak.json")
    out["plan_total_bytes"] = plan_total(command, workload)
    if trl_settings is not None:
        (folder / "trl").mkdir()
        settings = {**trl_settings, "dtype": "float32" if cpu else "bfloat16"}
        trl_command, trl_metrics = bench.plain_trl(workload, settings, folder / "trl")
        trl_command[2] = PEAK + trl_command[2]
        out["trl"] = measured(trl_command, trl_metrics, folder / "trl" / "peak.json")
        out["ratio_tokens_per_s"] = out["finetune"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
    return out


def measured(command: list[str], metrics: Path, peak: Path) -> dict:
    os.environ["GPU_CHECK_PEAK"] = str(peak)
    result = bench.measure(command, metrics, trained_share=1.0)
    result.pop("trained_tokens_per_s")
    if peak.exists():
        result["max_memory_allocated"] = json.loads(peak.read_text())["max_memory_allocated"]
    return result


def plan_total(command: list[str], workload: dict) -> int | None:
    """`finetune plan`'s memory total for the same recipe and overrides (None if it cannot tell)."""
    from finetune.plan import plan
    from finetune.recipe.load import load_recipe

    recipe_path = next(a for a in command if a.endswith("recipe.yaml"))
    overrides = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    return plan(load_recipe(recipe_path, overrides)).memory.total


def flops_per_token(model_dir: Path) -> tuple[float, float | None]:
    """Model FLOPs per trained token with a frozen base (4N + 2Vh) and the GPU's dense bf16 peak, if known."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.plan import GPU_TFLOPS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    n = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    matmul = n - (embed.numel() if embed is not head else 0)
    peak = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next(
            (tf * 1e12 for gpu, tf in GPU_TFLOPS.items() if gpu.replace(" ", "") in name.replace(" ", "")), None
        )
    return 4 * matmul + 2 * head.numel(), peak


def machine() -> dict:
    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "flash_attn", "liger_kernel", "deepspeed"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu or 'no GPU'}", "versions": versions}


def markdown(report: dict) -> str:
    lines = [f"GPU check: {report['machine']['machine']}; {report['workload_text']}", "",
             "| case | finetune tok/s | plain TRL tok/s | ratio | MFU | peak memory (max allocated) | plan's estimate |"
             " first step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, case in report["cases"].items():
        if "skipped" in case:
            lines.append(f"| {name} | skipped: {case['skipped']} | | | | | | |")
            continue
        ft, trl = case["finetune"], case.get("trl")
        mfu = f"{case['mfu']:.1%}" if case.get("mfu") is not None else "n/a"
        trl_rate = f"{trl['tokens_per_s']:.0f}" if trl else "-"
        ratio = f"{case['ratio_tokens_per_s']:.2f}x" if trl else "-"
        peak = ft.get("max_memory_allocated")  # on the CPU: the process's peak RSS instead
        memory = _gib(peak) if peak is not None else f"RSS {ft['peak_rss_mib']:.0f} MiB"
        lines.append(
            f"| {name} | {ft['tokens_per_s']:.0f} | {trl_rate} | {ratio} | {mfu} | "
            f"{memory} | {_gib(case.get('plan_total_bytes'))} | "
            f"{ft['time_to_first_step_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI): the same code, in seconds")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 8; 3 with --cpu)")
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds (GPU default 420)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --cpu for the tiny-shape check")
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.cpu else 420.0)
    cases = args.cases.split(",") if args.cases else (["lora-bf16", "qlora-nf4"] if args.cpu else list(CASES))
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}: use {', '.join(CASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        model_dir = build_model(folder, args.cpu)
        seq, batch = (64, 2) if args.cpu else (2048, 4)
        workload = {"model": str(model_dir), "data": str(rows(folder / "rows.jsonl", 64 if args.cpu else 512,
                                                              12 if args.cpu else 500)),
                    "steps": args.steps or (3 if args.cpu else 8), "batch_size": batch, "max_length": seq,
                    "lr": 2e-4, "rank": 16, "alpha": 32}  # fmt: skip
        flops, peak = flops_per_token(model_dir)
        report = {"machine": machine(), "workload": workload, "flops_per_token": flops, "peak_flops": peak,
                  "workload_text": f"8B-shaped Llama{' (tiny shapes)' if args.cpu else ''}, random weights, "
                  f"batch {batch} x up to {seq} tokens, {workload['steps']} steps, LoRA r16 all-linear",
                  "cases": {}}  # fmt: skip
        for name in cases:
            reason = missing(CASES[name][2]) or (
                f"time budget of {budget:.0f} s spent" if time.time() - start > budget else None
            )
            if reason:
                report["cases"][name] = {"skipped": reason}
            else:
                try:
                    case = run_case(name, workload, folder / name, args.cpu)
                    case["mfu"] = case["finetune"]["tokens_per_s"] * flops / peak if peak else None
                    report["cases"][name] = case
                except RuntimeError as e:
                    report["cases"][name] = {"skipped": f"failed: {str(e).strip().splitlines()[-1][:300]}"}
            print(f"{name}: {report['cases'][name]}", file=sys.stderr, flush=True)
        report["seconds"] = time.time() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu-check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
