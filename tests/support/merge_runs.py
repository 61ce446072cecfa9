"""Tiny trained runs for the merge and export tests, trained once per session and shared between them."""

from __future__ import annotations

from pathlib import Path

import tiny

from finetune.recipe.load import load_recipe

# (family, overrides, held-out data): the check prompts come from eval/examples.jsonl where there is
# held-out data, else from fixed conversations rendered by the chat template
RUNS = {
    "llama-lora": ("llama", [], True),
    "llama-dora": ("llama", ["lora.variant=dora"], False),
    "llama-nf4": ("llama", ["quantization.method=nf4"], False),
    "gemma-lora-lm_head": ("gemma", ["lora.modules_to_save=[lm_head]"], False),
    "gemma-dora": ("gemma", ["lora.variant=dora"], False),
    "gemma-nf4": ("gemma", ["quantization.method=nf4"], False),
    "llama-rslora": ("llama", ["lora.variant=rslora"], False),
    "llama-rank12": ("llama", ["lora.rank=12"], False),  # for export's vLLM check
}


_BUILT: dict[tuple[str, str], Path] = {}  # runs are trained once per session, shared with test_export


def make_run(root: Path, model_dir: Path, name: str, overrides: list[str], held_out: bool = True) -> Path:
    """Train a tiny run (4 steps, high learning rate so the adapter moves the logits); return its directory."""
    from finetune.train import train

    tiny.write_jsonl(root / "data" / "train.jsonl", tiny.reverse_rows(32, seed=len(name)))
    eval_line = "  eval: {split_ratio: 0.25}\n" if held_out else ""
    body = (
        f"name: {name}\nmodel: {{base: {model_dir}}}\nlora: {{rank: 8, alpha: 16}}\n"
        f"data:\n  train: [{{path: data/train.jsonl}}]\n{eval_line}  max_seq_length: 64\n"
        "train: {max_steps: 4, lr: 2.0e-2, batch_size: 8, warmup_ratio: 0.0, gradient_checkpointing: false}\n"
        f"eval: {{max_new_tokens: 4}}\noutput_dir: runs/{name}\n"
    )
    (root / "recipe.yaml").write_text(body)
    result = train(load_recipe(root / "recipe.yaml", overrides), progress=False)
    return Path(result.run_dir)


class Runs:
    """runs[name] -> the directory of a tiny trained run, trained on first use and kept for the session."""

    def __init__(self, tmp_path_factory, tiny_model_dir):
        self.factory, self.model_dir = tmp_path_factory, tiny_model_dir

    def __getitem__(self, name: str) -> Path:
        key = (str(self.factory.getbasetemp()), name)
        if key not in _BUILT:
            family, overrides, held_out = RUNS[name]
            _BUILT[key] = make_run(self.factory.mktemp(name), self.model_dir(family), name, overrides, held_out)
        return _BUILT[key]


def leftovers(parent: Path) -> list[str]:
    """Temporary directories of an atomic write that were not cleaned up."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
