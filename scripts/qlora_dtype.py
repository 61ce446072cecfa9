"""QLoRA: the non-quantized parameters (embeddings, output head, norms) in float32 or in the compute dtype?

    python scripts/qlora_dtype.py                       # quickstart, NF4, bf16 compute, 2 seeds x 2 layouts
    python scripts/qlora_dtype.py --steps 300 --seeds 0,1,2 --json qlora-dtype.json
    python scripts/qlora_dtype.py --task uniform --steps 300 --seeds 0,1,2   # a second task (scripts/quality_gate.py)

`fp32`: PEFT's prepare_model_for_kbit_training, which `finetune train` called on every quantized base until
issue #19 (int8 still): every parameter that is not quantized is cast to float32 (4.2 GB for Llama-3.1-8B's
embeddings and head). `compute`: left in bfloat16, as TRL's SFTTrainer leaves them when it is given a
quantized model (it does not call prepare_model_for_kbit_training), and as `finetune train` now does on 4-bit. Same data, seed, LoRA and steps; the training loss every
10 steps and the held-out loss at the end. Needs a CPU with bfloat16 support (AVX512-BF16/AMX) or a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from quality_gate import QUICKSTART, TASKS, build_task


def train(layout: str, task: tuple[Path, Path, int], seed: int, steps: int, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train_file, eval_file, max_len = task

    def rows(path: Path):
        data = load_dataset("json", data_files=str(path), split="train")
        return data.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                        remove_columns=["messages"])  # fmt: skip

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(QUICKSTART / "model", dtype=torch.bfloat16, quantization_config=quant)
    if layout == "fp32":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    kept = {str(p.dtype) for n, p in model.named_parameters() if "embed" in n or "norm" in n}
    curve: list[tuple[int, float]] = []

    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve.append((state.global_step, logs["loss"]))

    args = SFTConfig(output_dir=str(out), max_steps=steps, learning_rate=2e-3, lr_scheduler_type="cosine",
                     warmup_steps=0.05, per_device_train_batch_size=16, per_device_eval_batch_size=50, max_length=max_len,
                     bf16=True, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, logging_steps=10,
                     save_strategy="no", report_to="none", seed=seed, disable_tqdm=True)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(train_file), eval_dataset=rows(eval_file),
                         processing_class=AutoTokenizer.from_pretrained(QUICKSTART / "model"), peft_config=lora,
                         callbacks=[Curve()])  # fmt: skip
    trainer.train()
    return {"layout": layout, "seed": seed, "kept_dtypes": sorted(kept), "curve": curve,
            "eval_loss": trainer.evaluate()["eval_loss"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="quickstart")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        task = build_task(args.task, Path(tmp))
        for seed in (int(s) for s in args.seeds.split(",")):
            for layout in ("fp32", "compute"):
                runs.append(train(layout, task, seed, args.steps, Path(tmp) / f"{layout}-{seed}"))
                r = runs[-1]
                print(f"{layout:8} seed {seed}: eval loss {r['eval_loss']:.4f}, final train loss {r['curve'][-1][1]:.4f}, "
                      f"embeddings/norms {r['kept_dtypes']}", file=sys.stderr, flush=True)  # fmt: skip
    print("| layout | held-out loss (mean over seeds) | train loss at the end | largest curve gap vs fp32 |")
    print("|---|---|---|---|")
    for layout in ("fp32", "compute"):
        mine = [r for r in runs if r["layout"] == layout]
        ref = [r for r in runs if r["layout"] == "fp32"]
        gap = max(
            abs(a[1] - b[1])
            for m, f in zip(mine, ref, strict=True)
            for a, b in zip(m["curve"], f["curve"], strict=True)
        )
        print(f"| {layout} | {statistics.fmean(r['eval_loss'] for r in mine):.4f} | "
              f"{statistics.fmean(r['curve'][-1][1] for r in mine):.4f} | {gap:.4f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
