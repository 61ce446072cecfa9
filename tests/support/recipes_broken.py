"""A table of broken recipes, each with every problem it must produce: where, key and a phrase.

Shared by `recipe/test_schema.py` (through `load_recipe`) and `cli/test_app.py` (through `finetune validate`).
Each recipe is written as `recipe.yaml` in a workspace made by `make_workspace` and loaded with
that workspace as the working directory, so `where` is exactly `recipe.yaml:line:col`
(1-based, the position of the key that holds the bad value, or of the bad item in a list).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

RECIPE = "recipe.yaml"


def yaml_text(text: str) -> str:
    """Dedent a triple-quoted YAML block whose first line follows the opening quotes' newline."""
    return textwrap.dedent(text).lstrip("\n")


def make_workspace(root: Path) -> Path:
    """A tiny data file, a held-out file and a fake local model dir (validate only checks that its files exist)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (root / "data" / "train.jsonl").write_text(json.dumps(row) + "\n")
    (root / "data" / "eval.jsonl").write_text(json.dumps(row) + "\n")
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text('{"model_type": "llama"}\n')
    for name in ("model.safetensors", "tokenizer.json"):
        (root / "model" / name).write_text("{}\n")
    (root / "model" / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}\n')
    return root


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml_text(text))
    return path


GOOD = yaml_text(
    """
    name: demo
    model:
      base: ./model
    data:
      train:
        - path: data/train.jsonl
    """
)


@dataclass(frozen=True)
class Broken:
    id: str
    text: str
    problems: tuple[tuple[str, str, str], ...]  # (where, key, phrase in the message), in reported order


def _case(id: str, text: str, *problems: tuple[str, str, str]) -> Broken:
    return Broken(id, yaml_text(text), problems)


BROKEN: list[Broken] = [
    # --- unknown keys, with a did-you-mean, at the top level and inside every section --------
    _case(
        "unknown-top-level",
        """
        name: demo
        modle:
          base: ./model
        data:
          train:
            - path: data/train.jsonl
        """,
        ("recipe.yaml", "model", "required"),
        ("recipe.yaml:2:1", "modle", "did you mean 'model'?"),
    ),
    _case(
        "unknown-in-model",
        """
        name: demo
        model:
          base: ./model
          dtpye: bfloat16
        data:
          train:
            - path: data/train.jsonl
        """,
        ("recipe.yaml:4:3", "model.dtpye", "did you mean 'dtype'?"),
    ),
    _case(
        "unknown-in-quantization",
        """
        name: demo
        model: {base: ./model}
        quantization:
          methd: nf4
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "quantization.methd", "did you mean 'method'?"),
    ),
    _case(
        "unknown-in-lora",
        """
        name: demo
        model: {base: ./model}
        lora:
          rnak: 8
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.rnak", "did you mean 'rank'?"),
    ),
    _case(
        "unknown-in-data",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          max_seq_len: 1024
        """,
        ("recipe.yaml:5:3", "data.max_seq_len", "did you mean 'max_seq_length'?"),
    ),
    _case(
        "unknown-in-data-train-item",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
            - path: data/eval.jsonl
              formt: alpaca
        """,
        ("recipe.yaml:7:7", "data.train[1].formt", "did you mean 'format'?"),
    ),
    _case(
        "unknown-in-data-eval-split",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          eval: {split_rato: 0.1}
        """,
        ("recipe.yaml:5:3", "data.eval.split_ratio", "required: Share of the training rows"),
        ("recipe.yaml:5:10", "data.eval.split_rato", "did you mean 'split_ratio'?"),
    ),
    _case(
        "unknown-in-train",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          epoch: 2
        """,
        ("recipe.yaml:6:3", "train.epoch", "did you mean 'epochs'?"),
    ),
    _case(
        "unknown-in-eval",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        eval:
          metric: [loss]
        """,
        ("recipe.yaml:6:3", "eval.metric", "did you mean 'metrics'?"),
    ),
    _case(
        "key-in-wrong-section",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          rank: 32
        """,
        ("recipe.yaml:6:3", "train.rank", "unknown key here; it belongs at lora.rank"),
    ),
    _case(
        "section-key-at-top-level",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        lr: 1.0e-4
        """,
        ("recipe.yaml:5:1", "lr", "it belongs at train.lr"),
    ),
    _case(
        "unknown-with-no-close-match",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        notes: blue
        """,
        ("recipe.yaml:5:1", "notes", "unknown key; allowed: name, extends, seed, model"),
    ),
    # --- numbers out of range ------------------------------------------------------------------
    _case(
        "rank-zero",
        """
        name: demo
        model: {base: ./model}
        lora:
          rank: 0
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.rank", "must be ≥ 1 (got 0)"),
    ),
    _case(
        "rank-negative",
        """
        name: demo
        model: {base: ./model}
        lora: {rank: -4}
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:3:8", "lora.rank", "must be ≥ 1 (got -4)"),
    ),
    _case(
        "dropout-one",
        """
        name: demo
        model: {base: ./model}
        lora:
          dropout: 1.0
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.dropout", "must be < 1 (got 1.0)"),
    ),
    _case(
        "lr-zero",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          lr: 0
        """,
        ("recipe.yaml:6:3", "train.lr", "must be > 0 (got 0)"),
    ),
    _case(
        "lr-negative",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          lr: -2e-5
        """,
        ("recipe.yaml:6:3", "train.lr", "must be > 0 (got -2e-05)"),
    ),
    _case(
        "epochs-zero",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          epochs: 0
        """,
        ("recipe.yaml:6:3", "train.epochs", "must be > 0 (got 0)"),
    ),
    _case(
        "warmup-ratio-above-one",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          warmup_ratio: 1.5
        """,
        ("recipe.yaml:6:3", "train.warmup_ratio", "must be < 1 (got 1.5)"),
    ),
    _case(
        "split-ratio-zero",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          eval:
            split_ratio: 0
        """,
        ("recipe.yaml:6:5", "data.eval.split_ratio", "must be > 0 (got 0)"),
    ),
    _case(
        "split-ratio-one",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          eval: {split_ratio: 1}
        """,
        ("recipe.yaml:5:10", "data.eval.split_ratio", "must be < 1 (got 1)"),
    ),
    # --- enums, with a did-you-mean ---------------------------------------------------------------
    _case(
        "dtype-bf16",
        """
        name: demo
        model:
          base: ./model
          dtype: bf16
        data:
          train: [{path: data/train.jsonl}]
        """,
        (
            "recipe.yaml:4:3",
            "model.dtype",
            "must be one of: auto, bfloat16, float16, float32 (got 'bf16'); did you mean 'bfloat16'?",
        ),
    ),
    _case(
        "variant",
        """
        name: demo
        model: {base: ./model}
        lora:
          variant: doar
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.variant", "did you mean 'dora'?"),
    ),
    _case(
        "scheduler",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          scheduler: cosin
        """,
        ("recipe.yaml:6:3", "train.scheduler", "did you mean 'cosine'?"),
    ),
    _case(
        "format",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
              format: alpacca
        """,
        ("recipe.yaml:6:7", "data.train[0].format", "did you mean 'alpaca'?"),
    ),
    _case(
        "train-on",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          train_on: assistants
        """,
        ("recipe.yaml:5:3", "data.train_on", "did you mean 'assistant'?"),
    ),
    _case(
        "optimizer",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          optimizer: adamw_troch
        """,
        ("recipe.yaml:6:3", "train.optimizer", "did you mean 'adamw_torch'?"),
    ),
    _case(
        "quantization-method",
        """
        name: demo
        model: {base: ./model}
        quantization:
          method: nf5
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "quantization.method", "did you mean 'nf4'?"),
    ),
    _case(
        "targets-preset",
        """
        name: demo
        model: {base: ./model}
        lora:
          targets: all_linear
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.targets", "did you mean 'all-linear'?"),
    ),
    _case(
        "targets-one-name-not-a-list",
        """
        name: demo
        model: {base: ./model}
        lora:
          targets: q_proj
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.targets", "all-linear, or a list such as [q_proj] (got 'q_proj')"),
    ),
    _case(
        "chat-template",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          chat_template: llama-3
        """,
        ("recipe.yaml:5:3", "data.chat_template", "did you mean 'llama3'?"),
    ),
    # --- wrong types -------------------------------------------------------------------------------
    _case(
        "string-for-int",
        """
        name: demo
        model: {base: ./model}
        lora:
          rank: sixteen
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.rank", "must be a whole number (got 'sixteen')"),
    ),
    _case(
        "float-for-int",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          batch_size: 4.0
        """,
        ("recipe.yaml:6:3", "train.batch_size", "must be a whole number (got 4.0)"),
    ),
    _case(
        "list-for-str",
        """
        name: demo
        model:
          base: [./model, ./other]
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:3:3", "model.base", "must be text (got list)"),
    ),
    _case(
        "mapping-for-list",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            path: data/train.jsonl
        """,
        ("recipe.yaml:4:3", "data.train", "must be a list (got dict)"),
    ),
    _case(
        "mapping-for-targets",
        """
        name: demo
        model: {base: ./model}
        lora:
          targets: {q_proj: true}
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "lora.targets", "(got dict)"),
    ),
    _case(
        "scalar-for-section",
        """
        name: demo
        model: ./model
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:2:1", "model", "must be a mapping of keys (got './model')"),
    ),
    _case(
        "bad-name",
        """
        name: my run
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:1:1", "name", "must match"),
    ),
    # --- YAML traps ----------------------------------------------------------------------------------
    _case(
        "duplicate-key",
        """
        name: demo
        model: {base: ./model}
        lora:
          rank: 8
          alpha: 16
          rank: 64
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:6:3", "lora.rank", "duplicate key (first set at line 4); remove one"),
    ),
    _case(
        "duplicate-section",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        model: {base: org/other}
        """,
        ("recipe.yaml:5:1", "model", "duplicate key (first set at line 2)"),
    ),
    _case(
        "unquoted-no-as-text",
        """
        name: no
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:1:1", "name", "unquoted 'no' is a YAML 1.1 boolean; quote it ('no')"),
    ),
    _case(
        "unquoted-on-as-text",
        """
        name: demo
        model:
          base: ./model
          revision: on
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:3", "model.revision", "unquoted 'on' is a YAML 1.1 boolean"),
    ),
    _case(
        "unquoted-off-in-a-list",
        """
        name: demo
        model: {base: ./model}
        lora:
          targets: [q_proj, off]
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:21", "lora.targets[1]", "unquoted 'off' is a YAML 1.1 boolean"),
    ),
    _case(
        "unquoted-no-in-a-mapping-of-text",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
              columns: {messages: no}
        """,
        ("recipe.yaml:6:17", "data.train[0].columns.messages", "unquoted 'no' is a YAML 1.1 boolean"),
    ),
    _case(
        "merge-key",
        """
        name: demo
        model: {base: ./model}
        defaults: &small
          rank: 4
        lora:
          <<: *small
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:3:1", "defaults", "unknown key; allowed: name"),
        ("recipe.yaml:6:3", "", "YAML merge keys (<<) are not supported: use `extends:`"),
    ),
    _case(
        "unsupported-tag",
        """
        name: demo
        model: {base: ./model}
        lora:
          rank: !!python/int 8
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:9", "lora.rank", "unsupported YAML tag or value: tag:yaml.org,2002:python/int '8'"),
        ("recipe.yaml:4:3", "lora.rank", "must be a whole number (got '8')"),
    ),
    _case(
        "invalid-yaml",
        """
        name: demo
        model:
          base: ./model
         dtype: auto
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:4:2", "", "invalid YAML"),
    ),
    _case(
        "unclosed-flow-sequence",
        """
        name: demo
        model: {base: ./model}
        lora:
          targets: [q_proj, v_proj
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:5:5", "", "invalid YAML: expected ',' or ']'"),
    ),
    _case(
        "tab-indent",
        "name: demo\nmodel:\n\tbase: ./model\n",
        ("recipe.yaml:3:1", "", "invalid YAML: found character '\\t'"),
    ),
    _case(
        "two-documents",
        """
        name: demo
        ---
        name: other
        """,
        ("recipe.yaml:3:1", "", "expected one YAML document, found a second one"),
    ),
    # --- values validate once passed that train then refused, or ignored (issue 28) -----------------
    _case("negative-seed", GOOD + "seed: -5\n", ("recipe.yaml:7:1", "seed", "must be ≥ 0")),
    _case("seed-beyond-32-bits", GOOD + "seed: 1099511627776\n", ("recipe.yaml:7:1", "seed", "must be ≤ 4294967295")),
    _case(
        "non-finite-numbers",
        GOOD + "lora:\n  alpha: .inf\n  dropout: .nan\ntrain:\n  lr: .inf\n",
        ("recipe.yaml:8:3", "lora.alpha", "must be a finite number"),
        ("recipe.yaml:9:3", "lora.dropout", "must be a finite number"),
        ("recipe.yaml:11:3", "train.lr", "must be a finite number"),
    ),
    _case(
        "name-too-long",
        GOOD.replace("name: demo", "name: " + "a" * 300),
        ("recipe.yaml:1:1", "name", "must be at most 100 characters (got 300)"),
    ),
    _case("empty-output-dir", GOOD + "output_dir: ''\n", ("recipe.yaml:7:1", "output_dir", "must not be empty")),
    _case(
        "misspelled-column",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
              columns: {mesages: conversations}
        """,
        ("recipe.yaml:6:17", "data.train[0].columns.mesages", "did you mean 'messages'?"),
    ),
    _case(
        "group-by-length-under-dpo",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
              format: preference
          group_by_length: true
        train: {method: dpo}
        """,
        ("recipe.yaml:7:3", "data.group_by_length", "applies to sft only, not train.method dpo"),
    ),
    _case(
        "padding-free-under-kto",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
              format: unpaired
          padding_free: true
        train: {method: kto}
        """,
        ("recipe.yaml:7:3", "data.padding_free", "applies to sft only, not train.method kto"),
    ),
    _case(
        "grpo-completion-longer-than-the-sequence",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/train.jsonl
          max_seq_length: 64
        train:
          method: grpo
          batch_size: 8
          grpo: {rewards: [exact_match], max_completion_length: 64}
        """,
        ("recipe.yaml:10:34", "train.grpo.max_completion_length", "must be less than data.max_seq_length (64)"),
    ),
    # --- input built to hang or crash a parser (issue 28): refused at its line --------------------
    Broken(
        "alias-bomb",
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + GOOD,
        (("recipe.yaml:1:29", "e[0]", "aliases here copy more than 10,000 values"),),
    ),
    Broken(
        "deep-nesting",
        GOOD + "extra: " + "[" * 5000 + "]" * 5000 + "\n",
        (("recipe.yaml:7:107", "", "nested more than 100 levels deep"),),
    ),
    Broken(
        "huge-integer", GOOD + "seed: " + "9" * 5000 + "\n", (("recipe.yaml:7:7", "seed", "5000 digits is too large"),)
    ),
    Broken(
        "nul-byte", GOOD.replace("name: demo", "name: de\x00mo"), (("recipe.yaml:1:9", "", "0x0000 is not allowed"),)
    ),
    _case(
        "lone-surrogates-in-path-and-text-fields",
        """
        name: demo
        model:
          base: "./mo\\ud800del"
        data:
          train:
            - path: "data/\\udc80.jsonl"
          chat_template: "t\\ud800.jinja"
        output_dir: "runs/\\ud800"
        """,
        ("recipe.yaml:3:9", "model.base", "lone surrogate"),
        ("recipe.yaml:6:13", "data.train[0].path", "lone surrogate"),
        ("recipe.yaml:7:18", "data.chat_template", "lone surrogate"),
        ("recipe.yaml:8:13", "output_dir", "lone surrogate"),
    ),
    _case("top-level-list", "- name: demo\n- model: x\n", ("recipe.yaml", "", "a recipe must be a mapping of keys")),
    _case("top-level-scalar", "just some text\n", ("recipe.yaml", "", "a recipe must be a mapping of keys")),
    _case("empty-file", "", ("recipe.yaml", "", "the recipe is empty")),
    _case("only-comments", "# nothing here yet\n", ("recipe.yaml", "", "the recipe is empty")),
    # --- required fields --------------------------------------------------------------------------
    _case(
        "missing-name",
        """
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml", "name", "required: Run name"),
    ),
    _case(
        "missing-model-base",
        """
        name: demo
        model:
          dtype: auto
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:2:1", "model.base", "required: Hub model id"),
    ),
    _case(
        "missing-data-train",
        """
        name: demo
        model: {base: ./model}
        data:
          packing: true
        """,
        ("recipe.yaml:3:1", "data.train", "required: Training sources"),
    ),
    _case(
        "missing-source-path",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - format: alpaca
        """,
        ("recipe.yaml:5:7", "data.train[0].path", "required"),
    ),
    _case(
        "empty-train-list",
        """
        name: demo
        model: {base: ./model}
        data:
          train: []
        """,
        ("recipe.yaml:4:3", "data.train", "must have at least 1 item(s)"),
    ),
    # --- cross-field rules --------------------------------------------------------------------------
    _case(
        "double-quant-with-int8",
        """
        name: demo
        model: {base: ./model}
        quantization:
          method: int8
          double_quant: true
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:5:3", "quantization.double_quant", "only applies to 4-bit methods (nf4, fp4), not method 'int8'"),
    ),
    _case(
        "compute-dtype-without-4bit",
        """
        name: demo
        model: {base: ./model}
        quantization:
          compute_dtype: bfloat16
        data:
          train: [{path: data/train.jsonl}]
        """,
        (
            "recipe.yaml:4:3",
            "quantization.compute_dtype",
            "only applies to 4-bit methods (nf4, fp4), not method 'none'",
        ),
    ),
    _case(
        "eval-every-without-eval-data",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        train:
          eval_every: 50
        """,
        ("recipe.yaml:6:3", "train.eval_every", "needs held-out data: set data.eval"),
    ),
    _case(
        "unknown-eval-metric",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        eval:
          metrics:
            - loss
            - bleu
        """,
        ("recipe.yaml:8:7", "eval.metrics[1]", "unknown metric 'bleu'"),
    ),
    # --- files that must exist ---------------------------------------------------------------------
    _case(
        "missing-data-file",
        """
        name: demo
        model: {base: ./model}
        data:
          train:
            - path: data/missing.jsonl
        """,
        ("recipe.yaml:5:7", "data.train[0].path", "file not found: data/missing.jsonl"),
    ),
    _case(
        "missing-eval-file",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          eval:
            - path: data/held-out.jsonl
        """,
        ("recipe.yaml:6:7", "data.eval[0].path", "file not found: data/held-out.jsonl"),
    ),
    _case(
        "missing-model-dir",
        """
        name: demo
        model:
          base: ./models/llama
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:3:3", "model.base", "file not found: ./models/llama"),
    ),
    _case(
        "model-neither-path-nor-hub-id",
        """
        name: demo
        model:
          base: "llama 3 please"
        data:
          train: [{path: data/train.jsonl}]
        """,
        ("recipe.yaml:3:3", "model.base", "neither an existing local path nor a hub id"),
    ),
    _case(
        "missing-template-file",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          chat_template: templates/mine.jinja
        """,
        ("recipe.yaml:5:3", "data.chat_template", "file not found: templates/mine.jinja"),
    ),
    # --- new tokens (data.add_special_tokens, lora.new_tokens): what adding tokens was verified with ------------
    _case(
        "new-tokens-listed-twice",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
          add_special_tokens: ["<|a|>", "<|a|>"]
        """,
        ("recipe.yaml:5:3", "data.add_special_tokens", "lists a token twice"),
    ),
    _case(
        "new-tokens-with-dpo",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl, format: preference}]
          add_special_tokens: auto
        train: {method: dpo}
        """,
        ("recipe.yaml:5:3", "data.add_special_tokens", "train.method sft only, not dpo"),
    ),
    _case(
        "new-tokens-with-pissa",
        """
        name: demo
        model: {base: ./model}
        lora:
          init: {method: pissa}
        data:
          train: [{path: data/train.jsonl}]
          add_special_tokens: auto
        """,
        ("recipe.yaml:7:3", "data.add_special_tokens", "not supported with lora.init.method pissa"),
    ),
    _case(
        "new-tokens-rows-and-the-whole-embeddings",
        """
        name: demo
        model: {base: ./model}
        lora:
          modules_to_save: [embed_tokens]
        data:
          train: [{path: data/train.jsonl}]
          add_special_tokens: auto
        """,
        ("recipe.yaml:3:1", "lora.new_tokens", "set lora.new_tokens: modules_to_save"),
    ),
    # --- eval options with a rule of their own (finetune/scoring/structured.py) -----------------
    _case(
        "eval-regex-invalid",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        eval:
          metrics: [regex]
          regex: '[a-z'
        """,
        ("recipe.yaml:7:3", "eval.regex", "not a valid regular expression"),
    ),
    _case(
        "eval-json-schema-file-missing",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        eval:
          metrics: [json_schema]
          json_schema: schemas/answer.json
        """,
        ("recipe.yaml:7:3", "eval.json_schema", "file not found: schemas/answer.json"),
    ),
    _case(
        "eval-json-schema-metric-without-file",
        """
        name: demo
        model: {base: ./model}
        data:
          train: [{path: data/train.jsonl}]
        eval:
          metrics: [json_schema]
        """,
        ("recipe.yaml:5:1", "eval.json_schema", "metric json_schema needs the schema file"),
    ),
]

# Independent mistakes in one file: all are reported at once, in file order.
THREE_MISTAKES = Broken(
    "three-mistakes",
    yaml_text(
        """
        name: demo
        model:
          base: ./model
          dtype: bf16
        lora:
          rank: 0
        data:
          train: [{path: data/train.jsonl}]
        train:
          sheduler: cosine
        """
    ),
    (
        ("recipe.yaml:4:3", "model.dtype", "did you mean 'bfloat16'?"),
        ("recipe.yaml:6:3", "lora.rank", "must be ≥ 1 (got 0)"),
        ("recipe.yaml:10:3", "train.sheduler", "did you mean 'scheduler'?"),
    ),
)

# A YAML-level mistake does not hide the schema's: a user fixes the file in one pass.
MIXED_MISTAKES = Broken(
    "mixed-mistakes",
    yaml_text(
        """
        name: demo
        model:
          base: ./model
        lora:
          rank: 8
          rank: 16
        data:
          train: [{path: data/train.jsonl}]
          padding_free: maybe
        train: {lr: 0}
        """
    ),
    (
        ("recipe.yaml:6:3", "lora.rank", "duplicate key (first set at line 5)"),
        ("recipe.yaml:9:3", "data.padding_free", "must be true, false or auto (got 'maybe')"),
        ("recipe.yaml:10:9", "train.lr", "must be > 0 (got 0)"),
    ),
)
