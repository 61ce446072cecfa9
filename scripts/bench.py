"""`finetune train` against the plain TRL script a user would otherwise write, on the same workload.

    python scripts/bench.py                       # quickstart model and data, every variant, 2 rounds
    python scripts/bench.py --steps 40 --rounds 3 --variants lora,qlora --json bench.json
    python scripts/bench.py --variants lora,defaults --steps 300 --rounds 3 --quality   # speed and quality, one run

Each variant runs both ways, alternately, in fresh processes, `--rounds` times; the median is kept.
Figures per run: time to the first optimizer step (process start to the end of step 1, imports and
loading included), the training loop's time (step 1 to the last step) and the wall time (process start
to the last step: start-up, data preparation and loading included; evaluation after training excluded
on both sides), tokens/s after step 1 (all tokens, and trained ones), peak memory (max RSS of the
process on the CPU; torch.cuda.max_memory_allocated on a GPU). Ratios are plain TRL / finetune time
(above 1: finetune is faster) and finetune / plain TRL tokens/s, measured in the same invocation on
the same machine, so the machine's speed cancels out; on a shared machine the medians of alternate
runs are still disturbed, so rerun on an idle one for figures to quote.
With --quality, both models (each variant's first round) are scored on the same 100 held-out rows
by finetune's own evaluation code: exact match and held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAME = [
    "data.packing=false",
    "data.padding_free=false",
    "data.group_by_length=false",
    "train.gradient_checkpointing=false",
]  # TRL's settings, spelled out for finetune
VARIANTS = {
    # name: (recipe overrides for finetune, settings of the plain TRL script)
    "lora": (SAME, {}),
    "qlora": ([*SAME, "quantization.method=nf4"], {"nf4": True}),
    "packing": (["data.packing=true", "train.gradient_checkpointing=false"], {"packing": True}),
    "checkpointing": (
        ["data.packing=false", "data.group_by_length=false", "train.gradient_checkpointing=true"],
        {"gradient_checkpointing": True},
    ),
    "unfused-adamw": ([*SAME, "train.optimizer=adamw_torch"], {}),  # against TRL's default, the fused one
    # finetune's own defaults against TRL's (bar checkpointing, which TRL turns on even on a CPU: that would
    # flatter finetune, whose `auto` leaves it off where memory allows)
    "defaults": ([], {}),
}

# The plain TRL script: what a user writes from TRL's docs, with the workload's settings made equal.
PLAIN_TRL = textwrap.dedent("""
    import json, sys, time, torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    w = json.loads(sys.argv[1])
    rows = load_dataset("json", data_files=w["data"], split="train")
    # prompt/completion conversational rows: TRL trains on the completion (the assistant turn) only
    rows = rows.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}, remove_columns=["messages"])

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            with open(w["metrics"], "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **(logs or {})}) + "\\n")

    dtype = getattr(torch, w.get("dtype", "float32"))  # bfloat16 on a GPU (scripts/gpu_check.py)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if w["nf4"] else None
    model = AutoModelForCausalLM.from_pretrained(w["model"], dtype=dtype, quantization_config=quant)
    args = SFTConfig(output_dir=w["out"], max_steps=w["steps"], learning_rate=w["lr"],
                     per_device_train_batch_size=w["batch_size"], max_length=w["max_length"],
                     packing=w["packing"], gradient_checkpointing=w["gradient_checkpointing"],
                     bf16=dtype == torch.bfloat16,
                     logging_steps=1, logging_first_step=True, save_strategy="no", report_to="none", seed=42)
    lora = LoraConfig(r=w["rank"], lora_alpha=w["alpha"], lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows,
                         processing_class=AutoTokenizer.from_pretrained(w["model"]), peft_config=lora, callbacks=[Log()])
    trainer.train()
    if w.get("eval"):
        trainer.save_model(w["out"] + "/adapter")  # scored afterwards by finetune's evaluation code
""")


def finetune_recipe(workload: dict, overrides: list[str], folder: Path) -> tuple[list[str], Path]:
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: bench
        model: {{base: {workload["model"]}}}
        lora: {{rank: {workload["rank"]}, alpha: {workload["alpha"]}, dropout: 0.05, targets: all-linear}}
        data:
          train: [{{path: {workload["data"]}}}]
          max_seq_length: {workload["max_length"]}
          eval: {_held_out(workload)}
        train:
          max_steps: {workload["steps"]}
          lr: {workload["lr"]}
          batch_size: {workload["batch_size"]}
          logging_every: 1
        output_dir: {folder / "run"}
        eval: {{metrics: [loss, exact_match], compare_base: false, max_new_tokens: 128, batch_size: 50}}
        """)
    )
    sets = [a for o in overrides for a in ("--set", o)]
    command = [sys.executable, "-m", "finetune.cli", "train", str(recipe), "--json", *sets]
    return command, folder / "run" / "metrics.jsonl"


def _held_out(workload: dict) -> str:
    return f"[{{path: {workload['eval']}}}]" if workload.get("eval") else "null"


def plain_trl(workload: dict, settings: dict, folder: Path) -> tuple[list[str], Path]:
    spec = {"packing": False, "gradient_checkpointing": False, "nf4": False, **workload, **settings}
    spec |= {"out": str(folder / "out"), "metrics": str(folder / "metrics.jsonl")}
    return [sys.executable, "-c", PLAIN_TRL, json.dumps(spec)], folder / "metrics.jsonl"


def measure(command: list[str], metrics: Path, trained_share: float, stdout_path: Path | None = None) -> dict:
    """Run one training process; read its per-step log; take its peak RSS from the kernel; keep its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(metrics.parent.parent / "cache")}
    start = time.time()
    with open(stdout_path or os.devnull, "w") as stdout:
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{stderr[-3000:]}")
    logs = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in logs if "loss" in r and "num_tokens" in r]
    first, last = steps[0], steps[-1]
    tokens_per_s = (last["num_tokens"] - first["num_tokens"]) / (last["time"] - first["time"])
    return {
        "time_to_first_step_s": first["time"] - start,
        "loop_s": last["time"] - first["time"],
        "wall_s": last["time"] - start,
        "tokens_per_s": tokens_per_s,
        "trained_tokens_per_s": tokens_per_s * trained_share,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "final_loss": last["loss"],
    }


def varied_rows(path: Path, n_rows: int = 4000, seed: int = 0) -> str:
    """The quickstart's task with lists of 1 to 40 words: 15 to 260 tokens a row, as real SFT data varies."""
    import random

    words = quickstart_words()
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n_rows):
            picked = rng.choices(words, k=rng.randint(1, 40))
            chat = [{"role": "user", "content": "Reverse the list: " + ", ".join(picked)},
                    {"role": "assistant", "content": ", ".join(reversed(picked))}]  # fmt: skip
            fh.write(json.dumps({"messages": chat}) + "\n")
    return str(path)


def finetune_quality(stdout: Path) -> dict:
    """Held-out exact match and loss from `finetune train --json`'s result."""
    tuned = json.loads(stdout.read_text())["eval"]["tuned"]
    return {"exact_match": tuned["metrics"]["exact_match"], "loss": tuned["loss"]}


def trl_quality(workload: dict, adapter: Path) -> dict:
    """The plain TRL script's adapter scored exactly as finetune scores its own: same rows, masks, prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.data import prepare_data
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe
    from finetune.scoring import compare

    with tempfile.TemporaryDirectory() as tmp:
        command, _ = finetune_recipe(workload, [], Path(tmp))
        recipe = load_recipe(command[4])
        tokenizer = load_tokenizer(recipe)
        data = prepare_data(recipe, tokenizer, use_cache=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workload["model"]), str(adapter))
    e = recipe.eval
    tuned = compare(model, tokenizer, data.eval, data.eval_samples, ["loss", "exact_match"], e.max_new_tokens,
                    e.batch_size, with_base=False).tuned  # fmt: skip
    return {"exact_match": tuned.metrics["exact_match"], "loss": tuned.loss}


def quickstart_words() -> list[str]:
    """The words of the quickstart's lists: every one a few tokens of the quickstart tokenizer."""
    rows = (json.loads(line)["messages"] for line in (ROOT / "assets/quickstart/data/train.jsonl").open())
    return sorted({w for m in rows for w in m[-1]["content"].split(", ")})


def trained_share(workload: dict) -> float:
    """Share of tokens under the loss, from the same masks `finetune` trains with (TRL's are the same turns)."""
    from finetune.data import prepare_data
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        command, _ = finetune_recipe(workload, [], Path(tmp))
        recipe = load_recipe(command[4])
        stats = prepare_data(recipe, load_tokenizer(recipe), use_cache=False).stats
    return stats.trained_tokens / stats.train_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets/quickstart/model"))
    parser.add_argument("--data", help="a messages jsonl; default: rows of varied length built from the quickstart's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-data", help="held-out rows for --quality; default: 100 more varied rows")
    parser.add_argument("--quality", action="store_true", help="also score both models on the held-out rows")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    data = args.data or varied_rows(folder / "varied.jsonl")
    held_out = args.eval_data or (varied_rows(folder / "held-out.jsonl", 100, seed=1) if not args.data else None)
    if args.quality and held_out is None:
        parser.error("--quality with --data needs --eval-data: held-out rows of the same task")
    workload = {"model": args.model, "data": data, "steps": args.steps, "batch_size": args.batch_size,
                "max_length": args.max_length, "lr": 2e-3, "rank": 16, "alpha": 32,
                "eval": held_out if args.quality else None}  # fmt: skip
    share = trained_share(workload)
    results: dict[str, dict[str, list[dict]]] = {}
    quality: dict[str, dict[str, dict]] = {v: {} for v in args.variants.split(",")}
    for variant in args.variants.split(","):
        overrides, settings = VARIANTS[variant]
        results[variant] = {"finetune": [], "trl": []}
        for round_ in range(args.rounds):
            order = ("finetune", "trl") if round_ % 2 == 0 else ("trl", "finetune")
            for who in order:
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp)
                    command, metrics = (finetune_recipe(workload, overrides, folder) if who == "finetune"
                                        else plain_trl(workload, settings, folder))  # fmt: skip
                    results[variant][who].append(measure(command, metrics, share, folder / "stdout.txt"))
                    if args.quality and round_ == 0:  # quality depends on the seed, not the round
                        quality[variant][who] = (finetune_quality(folder / "stdout.txt") if who == "finetune"
                                                 else trl_quality(workload, folder / "out" / "adapter"))  # fmt: skip
                print(f"{variant:14} {who:8} round {round_ + 1}: {results[variant][who][-1]}", file=sys.stderr)
    table = summarise(results)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {_gpu() or 'no GPU'}"
    print(f"\nmachine: {machine}; workload: {args.steps} steps x batch {args.batch_size}, max length {args.max_length}; "
          f"medians of {args.rounds} alternate rounds")  # fmt: skip
    print(f"{'variant':14} {'tok/s ft':>9} {'tok/s trl':>9} {'ratio':>6} {'loop ft':>8} {'loop trl':>8} {'ratio':>6} "
          f"{'wall ft':>8} {'wall trl':>8} {'ratio':>6} {'RSS ft':>7} {'RSS trl':>7}  quality ft | trl (EM, loss)")  # fmt: skip
    for variant, row in table.items():
        ft, trl = row["finetune"], row["trl"]
        q = quality.get(variant, {})
        shown = " | ".join(
            f"{q[w]['exact_match']:.2f}, {q[w]['loss']:.4f}" if w in q else "-" for w in ("finetune", "trl")
        )
        print(f"{variant:14} {ft['tokens_per_s']:9.0f} {trl['tokens_per_s']:9.0f} {row['ratio_tokens_per_s']:6.2f} "
              f"{ft['loop_s']:7.1f}s {trl['loop_s']:7.1f}s {row['ratio_loop']:6.2f} {ft['wall_s']:7.1f}s "
              f"{trl['wall_s']:7.1f}s {row['ratio_wall']:6.2f} {ft['peak_rss_mib']:7.0f} {trl['peak_rss_mib']:7.0f}  "
              f"{shown}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "workload": workload, "runs": results, "quality": quality,
                                         "summary": table}, indent=2))  # fmt: skip
    return 0


def summarise(results: dict) -> dict:
    table = {}
    for variant, runs in results.items():
        med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
        med["ratio_tokens_per_s"] = med["finetune"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
        med["ratio_peak_rss"] = med["finetune"]["peak_rss_mib"] / med["trl"]["peak_rss_mib"]
        med["ratio_loop"] = med["trl"]["loop_s"] / med["finetune"]["loop_s"]  # > 1: finetune faster
        med["ratio_wall"] = med["trl"]["wall_s"] / med["finetune"]["wall_s"]
        table[variant] = med
    return table


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
