"""The recipe schema: the single source of truth for every option, default and rule.

Every section is strict (`extra="forbid"`: a typo is an error, never silently ignored),
frozen (a validated recipe cannot drift while a run uses it) and documented field by field;
`finetune schema` exports it as JSON Schema for editors. Loading from YAML (locations,
`extends`, `--set`, relative paths) lives in `finetune.loading`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
TargetPreset = Literal["attention", "mlp", "all-linear"]
BUILTIN_TEMPLATES = ("chatml", "llama3", "mistral", "gemma", "qwen2.5", "phi3")
BUILTIN_METRICS = ("loss", "perplexity", "exact_match", "contains", "regex", "json_valid")
FOUR_BIT_OPTIONS = ("double_quant", "compute_dtype", "quant_storage")  # errors when set without nf4/fp4
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# true, false, or `auto`: decided at train time for the machine the run is on (finetune.speed)
AutoBool = Annotated[
    Annotated[bool, Tag("bool")] | Annotated[Literal["auto"], Tag("auto")],
    Discriminator(lambda v: "auto" if isinstance(v, str) else "bool"),
]


class PathRef:
    """Marks a string field that may name a local path, resolved against the recipe file that set it.

    kind: "local" (always a path, may not exist yet), "file" (a path that must exist),
    "local_or_hub" (a path if it looks like one or exists, else a hub id), "template" (a path
    unless it is `auto` or a built-in template name).
    """

    def __init__(self, kind: Literal["local", "file", "local_or_hub", "template"]):
        self.kind = kind


class FieldRuleError(ValueError):
    """A cross-field rule failed; `field` is the dotted path, relative to the model, to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    """Base of every recipe section: nested models do not inherit `model_config` otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


def _by_type(value: Any) -> str:
    return "list" if isinstance(value, list) else "one"


class ModelSection(Section):
    base: Annotated[str, PathRef("local_or_hub")] = Field(
        description="Hub model id (`org/name`) or a local directory with config.json and safetensors weights.",
        min_length=1,
    )
    revision: str | None = Field(
        None, description="Hub branch, tag or commit to load; pin a commit hash for reproducibility."
    )
    dtype: Dtype = Field(
        "auto",
        description="Weight and compute dtype. `auto`: bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on the CPU.",
    )
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "auto",
        description="Attention kernel passed to transformers. `auto`: flash_attention_2 on a GPU in bf16/fp16 when "
        "the flash-attn package is installed (packed rows then need no attention mask), sdpa otherwise.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repository. Off unless you trust its author."
    )


class QuantizationSection(Section):
    method: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="bitsandbytes quantization of the frozen base: `nf4`/`fp4` (4-bit, QLoRA), `int8`, or `none`.",
    )
    double_quant: bool = Field(
        True, description="Also quantize the 4-bit quantization constants (saves ~0.4 bit/param). 4-bit only."
    )
    compute_dtype: Dtype = Field(
        "auto", description="Dtype of the matmuls on quantized weights; `auto` follows `model.dtype`. 4-bit only."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Storage dtype of the packed 4-bit weights; set it to the compute dtype (bfloat16) for FSDP, "
        "which must flatten them with the other parameters. 4-bit only.",
    )

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationSection:
        for option in FOUR_BIT_OPTIONS:
            if option in self.model_fields_set and self.method not in ("nf4", "fp4"):
                raise FieldRuleError(option, f"only applies to 4-bit methods (nf4, fp4), not method {self.method!r}")
        return self


class LoraSection(Section):
    rank: int = Field(16, ge=1, description="LoRA rank r: size of the low-rank update.")
    alpha: float = Field(
        32, gt=0, description="LoRA alpha: the update is scaled by alpha/rank (alpha/sqrt(rank) for rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: Annotated[
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), Tag("list")]
        | Annotated[TargetPreset, Tag("one")],
        Discriminator(_by_type),
    ] = Field(
        "all-linear",
        description="Modules that get adapters: a preset (`attention`, `mlp`, `all-linear`, resolved from the model's "
        "own linear layers) or a list of module names such as [q_proj, v_proj].",
    )
    variant: Literal["lora", "dora", "rslora"] = Field(
        "lora", description="`dora`: weight-decomposed LoRA; `rslora`: rank-stabilised scaling alpha/sqrt(rank)."
    )
    modules_to_save: list[str] = Field(
        [], description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens]."
    )


class DataSource(Section):
    path: Annotated[str, PathRef("local_or_hub")] = Field(
        description="A local .jsonl/.json/.csv/.parquet file, folder or glob, or a hub dataset id.", min_length=1
    )
    format: Literal["messages", "alpaca", "completion", "preference"] = Field(
        "messages",
        description="Row format: `messages` (role/content turns), `alpaca` (instruction/input/output), "
        "`completion` (prompt/completion, or text), `preference` (prompt/chosen/rejected; SFT trains on chosen).",
    )
    columns: dict[str, str] = Field(
        {}, description="Map the format's field names to this source's column names, e.g. {messages: conversations}."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Configuration (subset) of a hub dataset.")
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows (the first ones).")


class EvalSplit(Section):
    split_ratio: float = Field(
        gt=0, lt=1, description="Share of the training rows held out for evaluation, chosen by `seed`."
    )


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1, description="Training sources; several are concatenated.")
    eval: (
        Annotated[
            Annotated[EvalSplit, Tag("one")] | Annotated[list[DataSource], Field(min_length=1), Tag("list")],
            Discriminator(_by_type),
        ]
        | None
    ) = Field(
        None, description="Held-out data: {split_ratio: 0.1} of the training rows, or a list of sources like `train`."
    )
    max_seq_length: Annotated[
        Annotated[int, Field(ge=8), Tag("int")] | Annotated[Literal["auto"], Tag("auto")],
        Discriminator(lambda v: "auto" if isinstance(v, str) else "int"),
    ] = Field(2048, description="Tokens per training sequence, or `auto`: the 95th percentile of the data's lengths.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to rows longer than max_seq_length; they are counted either way."
    )
    packing: AutoBool = Field(
        "auto",
        description="Pack rows into sequences of up to max_seq_length tokens, without attention across rows "
        "(padding-free); `train.batch_size` then counts packed sequences. `auto`: on with flash attention, whose "
        "varlen kernels make it free; off otherwise, as SDPA would attend over the whole packed batch.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing, batch rows of similar length together (shuffled in groups of 50 batches): less "
        "padding, but batches far less random; off by default as it cost held-out quality in scripts/quality_gate.py "
        "(README, Speed).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="`assistant`: loss on assistant turns and their end-of-turn token only; `all`: every token.",
    )
    chat_template: Annotated[str, PathRef("template")] = Field(
        "auto",
        description=f"`auto` (the tokenizer's own), a built-in ({', '.join(BUILTIN_TEMPLATES)}) or a .jinja file.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row stops with its file and row (`error`), or is skipped and counted (`skip`).",
    )


class TrainSection(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; overrides epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up the learning rate.")
    batch_size: int = Field(4, ge=1, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "adafactor",
        "sgd",
    ] = Field(
        "adamw_torch_fused",
        description="Optimizer: `adamw_torch_fused` updates all tensors in one kernel (CPU and CUDA); the 8-bit and "
        "paged variants come from bitsandbytes.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: AutoBool = Field(
        "auto",
        description="Recompute activations in the backward pass: much less memory, 22-27% slower (measured). `auto`: on only "
        "when `finetune plan`'s estimate without it exceeds 90% of the GPU's memory; off on the CPU.",
    )
    liger_kernel: AutoBool = Field(
        "auto",
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU): faster and leaner on CUDA GPUs. `auto`: on "
        "a GPU when liger-kernel is installed (`pip install finetune[fast]`); needs a CUDA GPU when true.",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Held-out loss every N optimizer steps (and at the end). Needs `data.eval`."
    )
    save_every: int | None = Field(
        None, ge=1, description="Checkpoint every N optimizer steps; none: only the final adapter."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk (the best one is always kept).")
    logging_every: int = Field(10, ge=1, description="Log loss, learning rate and throughput every N optimizer steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="Experiment trackers, besides metrics.jsonl which is always written."
    )
    distributed: Annotated[str, PathRef("file")] | None = Field(
        None,
        description="An accelerate config (e.g. configs/accelerate/fsdp.yaml): `finetune train` then launches itself "
        "with `accelerate launch` on it. Unneeded under torchrun or accelerate launch.",
    )


class EvalSection(Section):
    metrics: list[Annotated[str, Field(min_length=1)]] = Field(
        ["loss", "exact_match"],
        description=f"Held-out metrics: {', '.join(BUILTIN_METRICS)}, or a `module:function` of your own.",
    )
    compare_base: bool = Field(
        True, description="Also evaluate the base model (adapter off) and report the difference."
    )
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per example for generation metrics.")
    batch_size: int = Field(
        16, ge=1, description="Examples generated per batch; also lm-eval's batch size for `harness` tasks."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Evaluate generation metrics on at most this many held-out rows, and each `harness` task on at "
        "most this many examples.",
    )
    harness: list[Annotated[str, Field(min_length=1), PathRef("local_or_hub")]] = Field(
        [],
        description="lm-evaluation-harness tasks run on the base and the tuned model (the adapter through lm-eval's "
        "`peft=`), results in eval/harness.json: task or group names such as `hellaswag`, or local task .yaml files "
        "or folders of them (every task inside), relative to the recipe. Needs `pip install lm-eval` and `data.eval`.",
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> EvalSection:
        for i, metric in enumerate(self.metrics):
            if metric not in BUILTIN_METRICS and ":" not in metric:
                raise FieldRuleError(
                    f"metrics[{i}]", f"unknown metric {metric!r}: use {', '.join(BUILTIN_METRICS)} or module:function"
                )
        return self


class Recipe(Section):
    """A complete fine-tuning recipe."""

    name: str = Field(pattern=NAME_PATTERN, description="Run name; output_dir defaults to runs/<name>.")
    extends: str | list[str] | None = Field(
        None,
        description="Base recipe file(s), relative to this file, deep-merged in order; this file wins, lists replace.",
    )
    seed: int = Field(42, description="Seed for data order, the eval split, LoRA initialisation and dropout.")
    model: ModelSection = Field(description="The base model.")
    quantization: QuantizationSection = Field(QuantizationSection(), description="Quantization of the frozen base.")
    lora: LoraSection = Field(LoraSection(), description="The adapter.")
    data: DataSection = Field(description="Training and held-out data.")
    train: TrainSection = Field(TrainSection(), description="Optimisation.")
    eval: EvalSection = Field(EvalSection(), description="Held-out evaluation.")
    output_dir: Annotated[str, PathRef("local")] | None = Field(
        None, description="Run directory; default runs/<name> under the working directory."
    )

    @model_validator(mode="after")
    def _eval_needs_data(self) -> Recipe:
        if self.train.eval_every is not None and self.data.eval is None:
            raise FieldRuleError("train.eval_every", "needs held-out data: set data.eval")
        if self.eval.harness and self.data.eval is None:
            raise FieldRuleError("eval.harness", "runs with the held-out comparison, which needs data.eval")
        return self

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.name}"

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data with `extends` applied away: what runs write to recipe.yaml.

        Options that do not apply are left out (4-bit options without a 4-bit method), so that
        the resolved recipe validates again.
        """
        exclude: dict[str, Any] = {"extends": True}
        if self.quantization.method not in ("nf4", "fp4"):
            exclude["quantization"] = set(FOUR_BIT_OPTIONS)
        return self.model_dump(mode="json", exclude=exclude)

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe, stable across key order."""
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()
