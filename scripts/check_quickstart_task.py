"""Check that the quickstart task is learnable in the quickstart's time budget, with plain PEFT + TRL.

This is deliberately independent of the `finetune` package: it is the reference measurement that
the packaged quickstart is expected to reproduce. It trains a LoRA (or an NF4 QLoRA) on
assets/quickstart/data/train.jsonl, then reports greedy exact match on eval.jsonl for the base
model and for the tuned one, plus the training wall time and eval loss.

Usage: python scripts/check_quickstart_task.py [--qlora] [--epochs 4] [--batch-size 16] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1] / "assets" / "quickstart"

Message = dict[str, str]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--qlora", action="store_true", help="load the base model in NF4 (bitsandbytes)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of the steps (< 1)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def load_rows(path: Path) -> list[list[Message]]:
    """Read the `messages` of every row of a chat JSONL file."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["messages"] for line in fh if line.strip()]


def to_prompt_completion(conversations: list[list[Message]]) -> Dataset:
    """Split each chat before its final assistant turn.

    TRL masks the prompt out of the loss for prompt/completion rows (`completion_only_loss`), which
    needs no `{% generation %}` markers in the ChatML template, unlike `assistant_only_loss`.
    """
    return Dataset.from_list([{"prompt": msgs[:-1], "completion": msgs[-1:]} for msgs in conversations])


def load_model(path: Path, qlora: bool) -> PreTrainedModel:
    """Load the base model in fp32, or NF4-quantized with fp32 compute for QLoRA."""
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")


@torch.no_grad()
def exact_match(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, conversations: list[list[Message]], batch_size: int = 50
) -> tuple[float, list[str]]:
    """Greedy-decode the assistant turn of every conversation and compare it (stripped) with the reference."""
    model.eval()
    tok.padding_side = "left"  # decoder-only batch generation needs the prompts flush right
    predictions: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [tok.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for m in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )
        predictions += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = [p.strip() == m[-1]["content"].strip() for p, m in zip(predictions, conversations, strict=True)]
    return sum(hits) / len(hits), predictions


def sft_config(args: argparse.Namespace, output_dir: str) -> SFTConfig:
    """TRL defaults to bf16 and activation (gradient) checkpointing even on CPU: both are switched off explicitly."""
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=50,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup,
        weight_decay=0.0,
        max_length=args.max_length,
        completion_only_loss=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # transformers 5 name; `gradient_checkpointing` is a deprecated alias
        use_cpu=True,
        logging_steps=25,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train(args: argparse.Namespace, tok: PreTrainedTokenizerBase, train_rows: Dataset, eval_rows: Dataset) -> Any:
    """Train the adapter and return the trainer (its model is the tuned PEFT model)."""
    model = load_model(args.model, args.qlora)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(args, output_dir),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tok,
            peft_config=lora,
        )
        if args.qlora:
            keep_adapters_fp32(trainer.model)
        result = trainer.train()
        print(f"train_runtime {result.metrics['train_runtime']:.1f}s  train_loss {result.metrics['train_loss']:.4f}")
        print(f"eval_loss {trainer.evaluate()['eval_loss']:.4f}")
    return trainer


def keep_adapters_fp32(model: torch.nn.Module) -> None:
    """Undo TRL's cast of trainable params to bf16 on quantized models (slow and lossy on CPU, no bf16 AMP here)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    train_convs = load_rows(args.data / "train.jsonl")[: args.max_train_rows]
    eval_convs = load_rows(args.data / "eval.jsonl")
    print(f"train rows {len(train_convs)}, eval rows {len(eval_convs)}, qlora={args.qlora}")

    base_em, base_preds = exact_match(load_model(args.model, args.qlora), tok, eval_convs)
    print(f"base exact match {base_em:.3f}  e.g. {base_preds[:2]!r}")
    trainer = train(args, tok, to_prompt_completion(train_convs), to_prompt_completion(eval_convs))
    tuned_em, tuned_preds = exact_match(trainer.model, tok, eval_convs)
    misses = [
        (p, m[-1]["content"]) for p, m in zip(tuned_preds, eval_convs, strict=True) if p.strip() != m[-1]["content"]
    ]
    print(f"tuned exact match {tuned_em:.3f}  misses e.g. {misses[:3]!r}")
    print(f"total wall {time.perf_counter() - wall:.1f}s")


if __name__ == "__main__":
    main()
