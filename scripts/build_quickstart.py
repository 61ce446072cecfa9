"""Build the committed quickstart assets: a tiny base model, its tokenizer and a toy SFT dataset.

The quickstart must run fully offline on a laptop CPU in a few minutes, so no hub model is usable.
Instead this script builds everything from material that ships with Python itself:

* a byte-level BPE tokenizer trained on the standard library's docstrings, with ChatML special
  tokens and chat template;
* a ~3.7M-parameter Llama-architecture model, briefly pretrained on the same docstrings so that
  it is a plausible "base model" (it has never seen chat-formatted text, so it cannot do the task);
* a small deterministic text-transformation dataset that a LoRA learns in about a minute;
* a preference set for the DPO quickstart (recipes/quickstart-dpo.yaml): the same reversal answered
  in a second, equally valid style (items joined with ' | ') preferred over the SFT style (', '),
  from the SFT training prompts, and held-out pairs from the SFT held-out prompts (disjoint).

Everything is seeded and the data order is fixed, so re-running the script reproduces the assets
(bitwise on the same CPU type, torch version and thread count).

Usage: python scripts/build_quickstart.py [--out assets/quickstart] [--steps N]
       python scripts/build_quickstart.py --preference-only   # only the preference files, from the SFT data
       python scripts/build_quickstart.py --slices-only       # only the held-out rows' `length` slice
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
NUM_THREADS = 2
VOCAB_SIZE = 3072  # multiple of 64: bitsandbytes' CPU 4-bit kernels need linear dims that are multiples of 32
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [IM_START, IM_END, PAD]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Stdlib packages left out of the corpus: tests are huge and repetitive, the rest are
# deprecated or vendored code whose docstrings add noise rather than English.
EXCLUDED_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


def seed_everything(seed: int) -> None:
    """Seed every RNG the build touches, so that re-runs give the same assets."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stdlib_sources() -> list[Path]:
    """List the stdlib's .py files in sorted order (sorted so the corpus order is deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not EXCLUDED_PARTS.intersection(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_docstrings(path: Path) -> Iterator[str]:
    """Yield module, class and function docstrings of one file, parsed with `ast` (never imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 20:
                yield doc


def collect_docstrings() -> list[str]:
    """Collect the pretraining corpus: every stdlib docstring, deduplicated, in file order."""
    seen: set[str] = set()
    docs: list[str] = []
    for path in stdlib_sources():
        for doc in iter_docstrings(path):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) with ChatML special tokens, wrapped as a fast HF tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Create the randomly initialised tiny Llama (every linear dim a multiple of 64, for bnb CPU 4-bit)."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def pack_corpus(tok: PreTrainedTokenizerFast, docs: list[str], block_size: int) -> torch.Tensor:
    """Tokenize docs, join them with eos and cut the stream into equal blocks (no padding to waste compute)."""
    stream: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(tok.eos_token_id)
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * progress)))


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """Average next-token loss over held-out blocks (the number reported as 'final LM loss')."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return float(np.mean(losses))


def batch_order(n_blocks: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield block indices for each step: a fresh seeded permutation per epoch, so the order is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        perm = torch.randperm(n_blocks, generator=gen)
        for start in range(0, n_blocks - batch_size + 1, batch_size):
            if step == steps:
                return
            yield perm[start : start + batch_size]
            step += 1


@torch.no_grad()
def copy_losses(model: LlamaForCausalLM) -> dict[str, float]:
    """Induction check: loss on a random token sequence, first time vs when it is repeated.

    A few minutes of pretraining on docstrings does not grow induction heads (both losses stay
    equal), i.e. the base model cannot copy from its context. The quickstart task is designed
    around that (see `reverse_rows`); this number is printed so that a change is noticed.
    """
    model.eval()
    gen = torch.Generator().manual_seed(SEED + 2)
    seq = torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (16, 40), generator=gen)
    ids = torch.cat([seq, seq], dim=1)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1], dim=-1)
    nll = -logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    model.train()
    return {"copy_loss_first": nll[:, :39].mean().item(), "copy_loss_second": nll[:, 40:].mean().item()}


def pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Plain AdamW loop; a fixed step count (not a time budget) keeps the result reproducible."""
    is_val = torch.zeros(len(blocks), dtype=torch.bool)
    is_val[::50] = True  # every 50th block, so the held-out loss covers the whole stdlib
    train_blocks, val_blocks = blocks[~is_val], blocks[is_val]
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stats = {"val_loss_start": mean_loss(model, val_blocks, args.batch_size)}
    print(f"train/val blocks {len(train_blocks)}/{len(val_blocks)}, val loss at init {stats['val_loss_start']:.3f}")
    model.train()
    start, running = time.perf_counter(), None
    for step, idx in enumerate(batch_order(len(train_blocks), args.batch_size, args.steps, SEED)):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = train_blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 25 == 0 or step == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.3f}  (ema {running:.3f})  {elapsed:6.1f}s")
    stats["train_loss_ema"] = float(running or 0.0)
    stats["val_loss_end"] = mean_loss(model, val_blocks, args.batch_size)
    stats.update(copy_losses(model))
    stats["seconds"] = time.perf_counter() - start
    print(f"val loss {stats['val_loss_start']:.3f} -> {stats['val_loss_end']:.3f} in {stats['seconds']:.0f}s")
    print(f"random tokens: loss {stats['copy_loss_first']:.2f} first time, {stats['copy_loss_second']:.2f} repeated")
    return stats


Message = dict[str, str]


def task_words(docs: list[str], tok: PreTrainedTokenizerFast, min_count: int = 30) -> list[str]:
    """Frequent lowercase docstring words that are a single token both with and without a leading space.

    The base model cannot copy from its context (see `copy_losses`), so the LoRA has to learn the
    copying itself. It does so within the time budget only when every list item is exactly one
    token, which puts each answer token at a fixed distance from its source token. Measured (LoRA r16,
    lr 2e-3): three one-token words reach 0.29 exact match after 2 epochs, 0.82 after 3, 1.00 after 4;
    3-4 words of any length stay at 0.00.
    """
    counts: dict[str, int] = {}
    for doc in docs:
        for word in re.findall(r"\b[a-z]{3,8}\b", doc):
            counts[word] = counts.get(word, 0) + 1
    frequent = sorted(w for w, c in counts.items() if c >= min_count)
    return [w for w in frequent if len(tok.tokenize(w)) == 1 and len(tok.tokenize(" " + w)) == 1]


def reverse_rows(words: list[str], n_rows: int, seed: int) -> list[list[Message]]:
    """Distinct 'reverse this 3-word list' chats (distinct prompts, so train/eval can be disjoint)."""
    rng = random.Random(seed)
    rows: list[list[Message]] = []
    seen: set[str] = set()
    while len(rows) < n_rows:
        picked = rng.sample(words, 3)
        prompt = "Reverse the list: " + ", ".join(picked)
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = ", ".join(reversed(picked))
        rows.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return rows


def write_jsonl(path: Path, rows: list[list[Message]], sliced: bool = False) -> None:
    """Write one `{"messages": [...]}` object per line (stable key order, ASCII, trailing newline); `sliced`
    adds each row's `length` slice (the held-out rows: recipes/quickstart.yaml reports eval per slice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for messages in rows:
            row = {"messages": messages} | ({"length": length_slice(messages)} if sliced else {})
            fh.write(json.dumps(row, ensure_ascii=True) + "\n")


def length_slice(messages: list[Message]) -> str:
    """The list's length in characters, in three near-equal thirds of the 100 held-out rows: short (up to 17
    characters, 34 rows), medium (18-19, 33 rows), long (20 or more, 33 rows). Every list has three words, so
    this is how much there is to copy, not how many items."""
    chars = len(messages[0]["content"].split(": ", 1)[1])
    return "short" if chars <= 17 else "medium" if chars <= 19 else "long"


def add_length_slices(data_dir: Path) -> None:
    """Rewrite eval.jsonl and preference_eval.jsonl with their `length` column (the rows and their order unchanged)."""
    lines = (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = [json.loads(line)["messages"] for line in lines]
    write_jsonl(data_dir / "eval.jsonl", held_out, sliced=True)
    write_preference_jsonl(data_dir / "preference_eval.jsonl", preference_rows(held_out, sliced=True))


PREFERENCE_TRAIN_ROWS = 800
PREFERRED_SEPARATOR = " | "


def preference_rows(rows: list[list[Message]], sliced: bool = False) -> list[dict[str, str]]:
    """Each reversal answered twice: the ' | ' style chosen over the SFT model's own ', ' style.

    Both answers are the correct reversal, so the pair teaches a style the SFT model does not have,
    not the task; the task's exact match can then be checked to survive the preference stage. `sliced` adds the
    row's `length` slice, as eval.jsonl has it (the held-out pairs: the DPO and GRPO examples report per slice).
    """
    out = []
    for messages in rows:
        user, assistant = messages
        items = assistant["content"].split(", ")
        row = {"prompt": user["content"], "chosen": PREFERRED_SEPARATOR.join(items), "rejected": assistant["content"]}
        out.append(row | ({"length": length_slice(messages)} if sliced else {}))
    return out


def write_preference_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=True) + "\n")


def write_preference_data(data_dir: Path) -> None:
    """preference_train.jsonl from the first SFT training rows, preference_eval.jsonl from the SFT held-out rows."""

    def read(name: str) -> list[list[Message]]:
        lines = (data_dir / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"] for line in lines]

    train, held_out = read("train.jsonl")[:PREFERENCE_TRAIN_ROWS], read("eval.jsonl")
    write_preference_jsonl(data_dir / "preference_train.jsonl", preference_rows(train))
    write_preference_jsonl(data_dir / "preference_eval.jsonl", preference_rows(held_out, sliced=True))
    print(f"preference: {len(train)} train / {len(held_out)} held-out pairs ('{PREFERRED_SEPARATOR}' over ', ')")


def verify_assets(model_dir: Path) -> None:
    """Reload the saved assets the way users will (Auto classes, offline) and check the chat contract."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.is_fast, "the quickstart needs a fast tokenizer (offset mappings)"
    ids = {t: tok.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert tok.eos_token == IM_END and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n", rendered
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", prompt
    assert tok("a b", return_offsets_mapping=True)["offset_mapping"]
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    sample = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1] :]
    print(f"verified {model_dir}: special token ids {ids}; base model says {tok.decode(sample)!r}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "quickstart")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps (~8 min on 2 idle cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument(
        "--preference-only", action="store_true", help="only (re)write the preference files from the SFT data files"
    )
    parser.add_argument("--slices-only", action="store_true", help="only add the `length` slice to the held-out files")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.preference_only:
        write_preference_data(args.out / "data")
        return
    if args.slices_only:
        add_length_slices(args.out / "data")
        return
    torch.set_num_threads(NUM_THREADS)  # results depend on the thread count; fixed for reproducibility
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)
    docs = collect_docstrings()
    tok = train_tokenizer(docs)
    print(f"{len(docs)} docstrings, {sum(map(len, docs))} chars; tokenizer vocab {len(tok)}")

    model = build_model(tok)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters (embeddings tied)")
    pretrain(model, pack_corpus(tok, docs, args.block_size), args)
    model_dir = args.out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    words = task_words(docs, tok)
    rows = reverse_rows(words, args.eval_rows + args.train_rows, SEED)
    write_jsonl(args.out / "data" / "eval.jsonl", rows[: args.eval_rows], sliced=True)
    write_jsonl(args.out / "data" / "train.jsonl", rows[args.eval_rows :])
    print(f"task: reverse 3 of {len(words)} words; {args.train_rows} train / {args.eval_rows} eval rows")
    write_preference_data(args.out / "data")
    verify_assets(model_dir)


if __name__ == "__main__":
    main()
