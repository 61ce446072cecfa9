"""The recipe schema: the single source of truth for every option, default and rule.

Every section is strict (`extra="forbid"`: a typo is an error, never silently ignored),
frozen (a validated recipe cannot drift while a run uses it) and documented field by field;
`finetune schema` exports it as JSON Schema for editors. Loading from YAML (locations,
`extends`, `--set`, relative paths) lives in `finetune.recipe.load`.
Its length (~710 lines) is the recipe's: one strict section class per recipe section, each field with its
description, and the cross-field rules beside the fields they join.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, model_validator

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
TargetPreset = Literal["attention", "mlp", "all-linear"]
BUILTIN_TEMPLATES = ("chatml", "llama3", "mistral", "gemma", "qwen2.5", "phi3")
EMBEDDING_LAYERS = ("embed_tokens", "lm_head", "wte", "embed_out")  # input and output embeddings, by usual name
LOSS_METRICS = ("loss", "perplexity")  # from the held-out loss; lower is better (finetune.summary)
GENERATION_METRICS = (
    "exact_match",
    "contains",
    "regex",
    "json_valid",
    "json_schema",
)  # scored on generations (finetune.evaluate)
BUILTIN_METRICS = LOSS_METRICS + GENERATION_METRICS
FOUR_BIT_OPTIONS = ("double_quant", "compute_dtype", "quant_storage")  # errors when set without nf4/fp4
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A run name becomes file and folder names with our prefixes and suffixes (`.name.abc123.tmp`): far below 255 bytes
NAME_MAX = 100
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit, and transformers' set_seed seeds numpy too
# The fields each data format reads: what `columns` may map (finetune.data.formats reads them by these names)
FORMAT_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output", "system"),
    "completion": ("prompt", "completion", "text"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
GPU_MEMORY_SHARE = 0.9  # `gradient_checkpointing: auto` turns on when the estimated peak exceeds this share of the GPU
# json_schema_extra of the keys that may change between a run and its `--resume`: they do not change what is trained
RESUMABLE = {"resumable": True}
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


class CallableRef:
    """Marks a string that may name a `module:function` of the user's, found beside the recipe that names it
    (`finetune.recipe.callables`); the function must accept `parameters` positionally."""

    def __init__(self, parameters: tuple[str, ...]):
        self.parameters = parameters


@dataclass(frozen=True)
class RecipeSource:
    """Where a loaded recipe came from: its file, the --set overrides, and the file:line:col of each key.

    Kept beside the recipe (not in it) so that checks run after loading can still name the line
    to fix, and messages can give the exact command that was run.
    """

    path: Path
    overrides: tuple[str, ...] = ()
    locations: dict[tuple[str | int, ...], str] = field(default_factory=dict)

    def where(self, key: tuple[str | int, ...]) -> str:
        """The file:line:col that set `key`, else its nearest parent's, else the recipe file."""
        for n in range(len(key), -1, -1):
            if key[:n] in self.locations:
                return self.locations[key[:n]]
        return str(self.path)

    def command(self, *extra: str, stage: str = "train") -> str:
        """`finetune STAGE RECIPE --set k=v ... EXTRA`, quoted for a POSIX shell: the command that was run."""
        sets = [part for override in self.overrides for part in ("--set", override)]
        return shlex.join(["finetune", stage, str(self.path), *sets, *extra])


class FieldRuleError(ValueError):
    """A cross-field rule failed; `field` is the dotted path, relative to the model, to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    """Base of every recipe section: nested models do not inherit `model_config` otherwise."""

    # allow_inf_nan=False: `.inf` and `.nan` are YAML numbers, but no option means anything with them
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True, allow_inf_nan=False)


def _by_type(value: Any) -> str:
    return "list" if isinstance(value, list) else "one"


class ModelSection(Section):
    base: Annotated[str, PathRef("local_or_hub")] | None = Field(
        None,
        description="Hub model id (`org/name`) or a local directory with config.json and safetensors weights. "
        "Required unless `from_run` names the run whose base is used.",
        min_length=1,
    )
    revision: str | None = Field(
        None, description="Hub branch, tag or commit to load; pin a commit hash for reproducibility."
    )
    dtype: Dtype = Field(
        "auto",
        description="Weight and compute dtype. `auto`: bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on the CPU, for the machine that runs the model (train, eval and merge: theirs; plan: a GPU).",
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
    from_run: str | None = Field(
        None,
        min_length=1,
        description="Continue a completed run directory (e.g. runs/sft, relative to the working directory like the "
        "default output_dir): its base model, revision, weights, tokenizer, "
        "chat template and LoRA settings are used. DPO, KTO and GRPO start from its adapter, which is also their "
        "frozen reference; SFT trains a fresh adapter on the parent's base. `base` may then be omitted; set, it must "
        "equal the parent's.",
    )

    @model_validator(mode="after")
    def _base_or_parent(self) -> ModelSection:
        if self.base is None and self.from_run is None:
            raise FieldRuleError(
                "base",
                "required: Hub model id (`org/name`) or a local directory, unless from_run names a run to continue",
            )
        return self


class QuantizationSection(Section):
    method: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="bitsandbytes quantization of the frozen base: `nf4`/`fp4` (4-bit, QLoRA), `int8`, or `none`. "
        "The parameters left unquantized (embeddings, head, norms) stay in `model.dtype` on 4-bit, float32 on int8.",
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


# lora.init (finetune.lora_init): what each initialisation needs and refuses, checked at validate time
LoraInitMethod = Literal["kaiming", "gaussian", "pissa", "olora", "loftq", "eva", "corda"]
BASE_MOVING_INITS = ("pissa", "olora", "corda")  # they subtract their initial adapter from the base weights
DATA_INITS = ("eva", "corda")  # a pass over training batches before the first step
INIT_OPTIONS = {
    "svd_iters": ("pissa",),
    "data_batches": DATA_INITS,
    "eva_rho": ("eva",),
    "eva_tau": ("eva",),
    "corda_mode": ("corda",),
}


class LoraInitSection(Section):
    method: LoraInitMethod = Field(
        "kaiming",
        description="How the adapter starts. `kaiming` (PEFT's default, `init_lora_weights: true`): A Kaiming-uniform, "
        "B zero. `gaussian`: A ~ N(0, 1/rank), B zero. `pissa`: A and B from the weight's top singular vectors, the "
        "base keeps the residual. `olora`: A and B from a QR decomposition of the weight, the base keeps the residual. "
        "`loftq` (needs quantization.method nf4): A and B from the SVD of the NF4 quantization error, so that "
        "base + adapter starts nearer the unquantized weights. `eva`: A from the SVD of the layer inputs on training "
        "batches, B zero. `corda`: A and B from the weight decomposed with the covariance of the layer inputs on "
        "training batches, the base keeps the residual; its B starts far larger than its A, so it wants a much lower "
        "`train.lr` than plain LoRA (PEFT's example: 2e-5; docs/guides/lora-options.md). The saved adapter is always a plain LoRA on the original base: "
        "for pissa, olora and corda it is converted at save time (rank 2 x lora.rank, PEFT's conversion).",
    )
    svd_iters: int | None = Field(
        None,
        ge=0,
        description="pissa only: the fast randomized SVD with this many subspace iterations (PEFT's "
        "`pissa_niter_N`; 16 is PEFT's suggestion for large models) instead of the full SVD; unset: full SVD.",
    )
    data_batches: int = Field(
        8,
        ge=1,
        description="eva and corda only: how many batches of train.batch_size rows of the prepared training data "
        "(the first rows in order, no shuffle) the initialisation's pass reads; recorded in the manifest.",
    )
    eva_rho: float = Field(
        1.0,
        ge=1.0,
        description="eva only: PEFT's rank redistribution; a layer may get up to rho x lora.rank. 1.0: every layer "
        "keeps lora.rank (PEFT's default is 2.0; above 1 the ranks differ per layer).",
    )
    eva_tau: float = Field(
        0.99,
        gt=0,
        le=1,
        description="eva only: PEFT's convergence threshold (cosine similarity of each layer's components between "
        "passes); EVA cycles over the data_batches until every layer reaches it, so a lower tau is a shorter pass.",
    )
    corda_mode: Literal["ipm", "kpm"] = Field(
        "ipm",
        description="corda only: `ipm` (instruction-previewed: adapt the directions the task's inputs use most) or "
        "`kpm` (knowledge-preserved: adapt the least used ones, keeping the base's knowledge).",
    )

    @model_validator(mode="after")
    def _options_fit(self) -> LoraInitSection:
        for option, methods in INIT_OPTIONS.items():
            if option in self.model_fields_set and self.method not in methods:
                raise FieldRuleError(
                    option, f"only applies to lora.init.method {' or '.join(methods)}, not {self.method!r}"
                )
        return self

    @property
    def on_quantized_base(self) -> bool:
        """Whether the adapter is relative to the quantized base rather than the original weights (LoftQ: its start
        B0 A0 is the NF4 quantization error): merged into the NF4 weights dequantized, never served on the original."""
        return self.method == "loftq"


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
    # --- per-layer structure (issue 33; checked against the model in finetune.lora_layers) ---
    rank_pattern: dict[Annotated[str, Field(min_length=1)], Annotated[int, Field(ge=1)]] = Field(
        {},
        description="Module-name pattern -> rank, overriding `rank` for the adapted modules it matches (PEFT's "
        "rank_pattern: a regular expression matched against the end of the full module name, e.g. "
        "{v_proj: 4, 'layers\\.0\\.self_attn\\.q_proj': 32}). A pattern that matches no adapted module is an error.",
    )
    alpha_pattern: dict[Annotated[str, Field(min_length=1)], Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Module-name pattern -> alpha, overriding `alpha` like rank_pattern overrides `rank` "
        "(PEFT's alpha_pattern).",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="Indices of the transformer blocks (0-based) whose target modules get adapters, e.g. "
        "[20, 21, 22, 23]; none: every block (PEFT's layers_to_transform). An index the model lacks is an error.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> LoraSection:
        import re

        for option in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, option):
                try:
                    re.compile(key)
                except re.error as e:
                    raise FieldRuleError(option, f"{key!r} is not a regular expression: {e}") from None
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise FieldRuleError("layers", "lists a block twice")
        return self

    # --- end of per-layer structure ---
    new_tokens: Literal["trainable_rows", "modules_to_save"] = Field(
        "trainable_rows",
        description="How the tokens that data.add_special_tokens adds are trained: `trainable_rows` trains only their "
        "rows of the input embeddings and (untied) output layer (PEFT's trainable_token_indices; a small adapter, "
        "not served by vLLM LoRA serving); `modules_to_save` trains both matrices in full and saves them with the "
        "adapter (a large adapter, refused by vLLM). Either way the adapter's tokenizer holds the new tokens.",
    )
    init: LoraInitSection = Field(LoraInitSection(), description="How the adapter's weights start (lora.init).")


class DataSource(Section):
    path: Annotated[str, PathRef("local_or_hub")] = Field(
        description="A local .jsonl/.json/.csv/.parquet file, folder or glob, or a hub dataset id.", min_length=1
    )
    format: Literal["messages", "alpaca", "completion", "preference", "unpaired"] = Field(
        "messages",
        description="Row format: `messages` (role/content turns), `alpaca` (instruction/input/output), "
        "`completion` (prompt/completion, or text), `preference` (prompt/chosen/rejected as text, or chosen/rejected "
        "conversations sharing their prompt turns; SFT trains on chosen), `unpaired` (prompt/completion/label, "
        "label true for a desirable completion: KTO only).",
    )
    columns: dict[str, str] = Field(
        {},
        description="Map the format's field names to this source's column names, e.g. {messages: conversations}; "
        "the fields: " + "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FORMAT_FIELDS.items()) + ".",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Configuration (subset) of a hub dataset.")
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows (the first ones).")
    # --- weighted mixing (data/mix.py, issue 31 item 2) ---
    weight: float | None = Field(
        None,
        gt=0,
        description="Sampling weight of this training source: the share of an epoch's rows drawn from it, whatever "
        "its size (weights are normalised to sum to 1; give every training source one, or none). See data.mix_stop.",
    )
    # --- end weighted mixing ---
    # --- streaming (data/stream.py, issue 31 item 3) ---
    streaming: bool = Field(
        False,
        description="Read this training source as a stream (`datasets`' iterable datasets) instead of preparing all "
        "its rows before training: for sources too large to tokenize up front. Needs `train.max_steps`; every training "
        "source streams or none; held-out rows come from `data.eval` sources (read whole); `finetune data`, `plan` and "
        "the manifest report a sample of the stream's first rows; `--resume` continues the exact row sequence.",
    )
    # --- end streaming ---
    slice: str | None = Field(
        None,
        min_length=1,
        description="Held-out source: the slice its rows are reported under (every eval figure is given overall and "
        "per slice); wins over `eval.slice_by`.",
    )

    @model_validator(mode="after")
    def _known_columns(self) -> DataSource:
        fields = FORMAT_FIELDS[self.format]
        for key in self.columns:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                raise FieldRuleError(
                    f"columns.{key}",
                    f"format {self.format} has no field {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else f": map one of {', '.join(fields)}"),
                )
        return self


class EvalSplit(Section):
    split_ratio: float = Field(
        gt=0, lt=1, description="Share of the training rows held out for evaluation, chosen by `seed`."
    )


class DataSection(Section):
    train: list[DataSource] = Field(
        min_length=1, description="Training sources; several are concatenated, or mixed by their `weight`."
    )
    # --- weighted mixing (data/mix.py, issue 31 item 2) ---
    mix_stop: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="With weighted sources, when an epoch over the mix ends: `first_exhausted` when the first source "
        "runs out of rows (no row repeats), `all_exhausted` when every source has run out at least once (the smaller "
        "sources' rows repeat). Rows are drawn source by source with the weights as probabilities, seeded by `seed`.",
    )
    # --- end weighted mixing ---
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
    padding_free: AutoBool = Field(
        "auto",
        description="Run each batch as one flattened sequence without pad tokens, attention kept within each row: "
        "the same rows and the same loss as padded batches, less compute. `auto`: on with flash attention, whose "
        "varlen kernels make it free; off otherwise, as SDPA would attend over the whole flattened batch.",
    )
    packing: AutoBool = Field(
        False,
        description="Pack rows into sequences of up to max_seq_length tokens (padding-free); `train.batch_size` then "
        "counts packed sequences, so each step holds more rows and an epoch has fewer steps: a different "
        "optimisation, which cost held-out quality at the same epochs in scripts/quality_gate.py (docs/measurements/speed.md). "
        "`auto` (the old default, which packed with flash attention) still loads and means false, except "
        "when resuming a run that packed.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing, batch rows of similar length together (shuffled in groups of 50 batches): less "
        "padding, but batches far less random; off by default as it cost held-out quality in scripts/quality_gate.py "
        "(docs/measurements/speed.md).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="`assistant`: loss on assistant turns and their end-of-turn token only; `all`: every token.",
    )
    chat_template: Annotated[str, PathRef("template")] = Field(
        "auto",
        description=f"`auto` (the tokenizer's own), a built-in ({', '.join(BUILTIN_TEMPLATES)}) or a .jinja file.",
    )
    add_special_tokens: Annotated[
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), Tag("list")]
        | Annotated[Literal["none", "auto"], Tag("one")],
        Discriminator(_by_type),
    ] = Field(
        "none",
        description="Special tokens added to the base tokenizer before the data is tokenized: `none` (a template "
        "marker the tokenizer lacks, like ChatML's <|im_start|> on a base model, is split into ordinary tokens, with "
        "a warning), `auto` (add the chat template's markers the tokenizer lacks), or a list of tokens (each must be "
        "new). The model's embeddings grow to hold them, their rows are trained as lora.new_tokens says, and the "
        "tokenizer saved with the adapter holds them.",
    )
    dedup: Literal["none", "exact", "near"] = Field(
        "none",
        description="Drop repeated training rows: `exact` (same text after normalising whitespace) or `near` (also "
        "MinHash near-duplicates, see near_duplicate_threshold), keeping the first. Off by default: dropping rows "
        "changes what the model sees; `finetune data` reports duplicates either way.",
    )
    leakage: Literal["warn", "drop", "error"] = Field(
        "warn",
        description="Training rows whose prompt or conversation also appears (exactly or nearly) in the held-out "
        "data inflate every eval figure: `warn` reports them, `drop` removes them from train (the eval set stays "
        "as it is, comparable across runs), `error` stops before training.",
    )
    near_duplicate_threshold: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of word 3-gram sets at or above which two rows count as near-duplicates "
        "(duplicates, leakage): MinHash with LSH finds the candidates, each is verified exactly; lower finds more.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row stops with its file and row (`error`), or is skipped and counted per reason "
        "in the manifest and `finetune data` (`skip`). A file that cannot be read at all (empty, truncated, not a "
        "list) stops either way.",
    )

    # --- weighted mixing (data/mix.py, issue 31 item 2) ---
    @model_validator(mode="after")
    def _weights_all_or_none(self) -> DataSection:
        weighted = [i for i, source in enumerate(self.train) if source.weight is not None]
        if weighted and len(weighted) < len(self.train):
            missing = next(i for i in range(len(self.train)) if i not in weighted)
            raise FieldRuleError(
                f"train.{missing}.weight",
                "give every training source a weight, or none: the weights are the shares of the mix",
            )
        for i, source in enumerate(self.eval if isinstance(self.eval, list) else []):
            if source.weight is not None:
                raise FieldRuleError(f"eval.{i}.weight", "weights mix training sources; held-out sources are all read")
        return self

    # --- end weighted mixing ---


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip
PREFERENCE_METHODS = ("dpo", "kto")
OPTION_METHODS = (*PREFERENCE_METHODS, "grpo")  # methods with an options section of their own (train.<method>)
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


class MethodOptions(Section):
    """Options of one training method; a key that belongs to another method says which one."""

    @model_validator(mode="before")
    @classmethod
    def _other_methods_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            method = cls.__name__.removesuffix("Options").lower()
            for key in data:
                if key in cls.model_fields:
                    continue
                owners = [m.__name__.removesuffix("Options").lower() for m in METHOD_OPTIONS if key in m.model_fields]
                if owners:
                    raise FieldRuleError(
                        key, f"is an option of method {owners[0]} (train.{owners[0]}.{key}), not of {method}"
                    )
        return data


class DpoOptions(MethodOptions):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference: higher stays closer to the parent model."
    )
    loss_type: Annotated[
        Annotated[list[Literal[DPO_LOSSES]], Field(min_length=1), Tag("list")]  # type: ignore[valid-type]
        | Annotated[Literal[DPO_LOSSES], Tag("one")],  # type: ignore[valid-type]
        Discriminator(_by_type),
    ] = Field(
        "sigmoid",
        description="TRL DPOConfig loss, or a list summed with `loss_weights`: `sigmoid` (DPO), `ipo`, `hinge`, "
        "`robust`, `apo_zero`, ...; `[sigmoid, sft]` adds the SFT loss on chosen (RPO), which keeps the model "
        "generating well-formed answers while it learns the preference.",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weight of each `loss_type` entry (same length); default 1.0 each."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (`robust`, cDPO) or EXO's epsilon (`exo_pair`)."
    )

    @model_validator(mode="after")
    def _weights_match(self) -> DpoOptions:
        losses = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise FieldRuleError(
                "loss_weights", f"has {len(self.loss_weights)} weights for {len(losses)} loss types ({losses})"
            )
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise FieldRuleError("label_smoothing", "must be > 0 with loss_type exo_pair (the EXO paper uses 1e-3)")
        return self


class KtoOptions(MethodOptions):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference: higher stays closer to the parent model."
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="TRL KTOConfig loss.")
    desirable_weight: float = Field(
        1.0, gt=0, description="Weight of desirable examples' losses; raise it when they are fewer than undesirable."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples' losses.")


Reward = Annotated[str, Field(min_length=1), CallableRef(("prediction", "reference"))]


class GrpoOptions(MethodOptions):
    rewards: list[Reward] = Field(
        min_length=1,
        description="Reward functions, summed with `reward_weights`: a built-in generation metric "
        f"({', '.join(GENERATION_METRICS)}) or `module:function(prediction, reference) -> float`, the same convention "
        "as `eval.metrics` (found beside the recipe; `validate` imports it). The reference is the row's answer "
        "(the last assistant turn, or `completion`); every reward is also scored on held-out data.",
    )
    reward_weights: list[float] | None = Field(
        None, description="Weight of each reward (same length as `rewards`); default 1.0 each."
    )
    num_generations: int = Field(
        8,
        ge=2,
        description="Completions sampled per prompt; advantages compare them within their group. "
        "`train.batch_size` x `grad_accum` counts completions, so it must be a multiple of this.",
    )
    max_completion_length: int = Field(256, ge=1, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the completions (1.0: off).")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty towards the reference (the parent run's adapter, or the base): 0 loads no "
        "reference and is TRL's default; 0.001-0.04 keeps the policy closer to where it started.",
    )
    loss_type: Literal[GRPO_LOSSES] = Field(  # type: ignore[valid-type]
        "dapo",
        description="TRL GRPOConfig loss: `dapo` (token-level, no length bias; TRL's default), `grpo`, `dr_grpo`, "
        "`bnpo`, `cispo`, `sapo`.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward's standard deviation in the group, the batch, or not."
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping range of the policy ratio.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of generated completions.")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at `max_completion_length` out of the loss (DAPO)."
    )
    use_vllm: bool = Field(
        False,
        description="Generate with vLLM inside the training process (TRL's colocate mode) instead of transformers' "
        "generate with the KV cache: much faster on a CUDA GPU; needs `pip install vllm`.",
    )

    @model_validator(mode="after")
    def _weights_match(self) -> GrpoOptions:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise FieldRuleError(
                "reward_weights", f"has {len(self.reward_weights)} weights for {len(self.rewards)} rewards"
            )
        for i, reward in enumerate(self.rewards):
            if reward not in GENERATION_METRICS and ":" not in reward:
                raise FieldRuleError(
                    f"rewards[{i}]",
                    f"unknown reward {reward!r}: use {', '.join(GENERATION_METRICS)} or module:function",
                )
        return self


METHOD_OPTIONS = (DpoOptions, KtoOptions, GrpoOptions)


class TrainSection(Section):
    method: Literal["sft", "dpo", "kto", "grpo"] = Field(
        "sft",
        description="`sft`: supervised fine-tuning; `dpo`: Direct Preference Optimization on `preference` data; "
        "`kto`: Kahneman-Tversky Optimization on `unpaired` or `preference` data; `grpo`: reinforcement learning "
        "from `train.grpo.rewards` on the prompts of any SFT format. These usually continue an SFT run "
        "(`model.from_run`), whose adapter is then also their frozen reference.",
    )
    dpo: DpoOptions = Field(DpoOptions(), description="Options of `method: dpo` (TRL's DPOTrainer).")
    kto: KtoOptions = Field(KtoOptions(), description="Options of `method: kto` (TRL's KTOTrainer).")
    grpo: GrpoOptions | None = Field(
        None, description="Options of `method: grpo` (TRL's GRPOTrainer); required with it, for its `rewards`."
    )
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
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices (and DoRA magnitudes, biases) learn at `lr` x this ratio, the A matrices "
        "at `lr` (PEFT's create_loraplus_optimizer; its paper suggests 16, with a lower `lr`: on the quickstart, 16 "
        "diverges at lr 2e-3 and learns at 5e-4). Works with every "
        "`optimizer` choice; none: plain LoRA, one learning rate.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: AutoBool = Field(
        "auto",
        description="Recompute activations in the backward pass: much less memory, 22-27% slower (measured). `auto`: on only "
        f"when `finetune plan`'s estimate without it exceeds {GPU_MEMORY_SHARE:.0%} of the GPU's memory; off on the CPU.",
    )
    liger_kernel: AutoBool = Field(
        "auto",
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU): faster and leaner on CUDA GPUs. `auto`: on "
        "a GPU when liger-kernel is installed (`pip install finetune[fast]`); needs a CUDA GPU when true.",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Held-out loss every N optimizer steps (and at the end). Needs `data.eval`.",
        json_schema_extra=RESUMABLE,
    )
    save_every: int | None = Field(
        None,
        ge=1,
        description="Checkpoint every N optimizer steps; none: only the final adapter.",
        json_schema_extra=RESUMABLE,
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="Newest checkpoints kept on disk (the best one is always kept).",
        json_schema_extra=RESUMABLE,
    )
    logging_every: int = Field(
        10,
        ge=1,
        description="Log loss, learning rate and throughput every N optimizer steps.",
        json_schema_extra=RESUMABLE,
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [],
        description="Experiment trackers, besides metrics.jsonl which is always written.",
        json_schema_extra=RESUMABLE,
    )
    distributed: Annotated[str, PathRef("file")] | None = Field(
        None,
        description="An accelerate config (e.g. configs/accelerate/fsdp.yaml): `finetune train` then launches itself "
        "with `accelerate launch` on it. Unneeded under torchrun or accelerate launch.",
    )


# --- eval.judge (issue 32: an LLM judge on any OpenAI-compatible endpoint; finetune/judge.py runs it) ---
JUDGE_FIELDS = {"prompt", "reference", "answer", "answer_a", "answer_b", "min", "max"}
JUDGE_SCORE_RUBRIC = (
    "Rate the answer to the request below on a scale from {min} to {max} ({max} is best): is it correct and "
    "helpful? Reply with the number only.\n\nRequest:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Answer to rate:\n{answer}\n\nScore:"
)
JUDGE_PAIRWISE_RUBRIC = (
    "Two answers to the request below. Which is better: correct, helpful, in the right tone? Reply with A, B or "
    "tie only.\n\nRequest:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer A:\n{answer_a}\n\n"
    "Answer B:\n{answer_b}\n\nBetter answer:"
)


class JudgeSection(Section):
    url: str = Field(
        pattern=r"^https?://\S+$",
        description="Base URL of an OpenAI-compatible API (a hosted one, vLLM, or `finetune serve`), e.g. "
        "http://127.0.0.1:8000/v1: the judge is asked at URL/chat/completions.",
    )
    model: str = Field(min_length=1, description="The judge's model name at that endpoint (`model` of the request).")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The NAME of the environment variable holding the endpoint's API key (sent as a Bearer token); "
        "never the key itself, which no recipe, manifest, log or result holds. None: no key is sent.",
    )
    mode: Literal["score", "pairwise"] = Field(
        "score",
        description="`score`: each answer (tuned and base) rated on `scale`; `pairwise`: tuned and base answers shown "
        "together in a seeded random order, the judge picks one: a win rate, with position bias counted.",
    )
    rubric: str | None = Field(
        None,
        min_length=1,
        description="The judge's prompt, with {prompt}, {reference}, {min}, {max} and {answer} (score mode) or "
        "{answer_a} and {answer_b} (pairwise). None: a built-in rubric for the mode.",
    )
    scale: list[int] = Field(
        [1, 5],
        min_length=2,
        max_length=2,
        description="[lowest, highest] score (score mode); other replies are unscored.",
    )
    max_tokens: int = Field(16, ge=1, description="The judge's reply budget, in tokens: a score or a letter is short.")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for one judge reply before retrying.")
    retries: int = Field(
        3, ge=0, description="Retries of a failed request (unreachable, timeout, 429, 5xx), with backoff."
    )
    concurrency: int = Field(4, ge=1, description="Judge requests in flight at once.")

    @model_validator(mode="after")
    def _rubric_fields(self) -> JudgeSection:
        if self.scale[0] >= self.scale[1]:
            raise FieldRuleError("scale", f"must be [lowest, highest] with lowest < highest (got {self.scale})")
        needed = {"answer"} if self.mode == "score" else {"answer_a", "answer_b"}
        used = set(re.findall(r"\{([a-z_]+)\}", self.rubric or ""))
        if unknown := used - JUDGE_FIELDS:
            raise FieldRuleError("rubric", f"unknown field(s) {sorted(unknown)}: use {sorted(JUDGE_FIELDS)}")
        if self.rubric is not None and (missing := needed - used):
            raise FieldRuleError(
                "rubric", f"mode {self.mode} needs {', '.join('{' + m + '}' for m in sorted(missing))}"
            )
        return self

    def template(self) -> str:
        """The rubric the judge is sent: the recipe's, else the mode's built-in one."""
        return self.rubric or (JUDGE_SCORE_RUBRIC if self.mode == "score" else JUDGE_PAIRWISE_RUBRIC)


class EvalSection(Section):
    metrics: list[Annotated[str, Field(min_length=1), CallableRef(("prediction", "reference"))]] = Field(
        ["loss", "exact_match"],
        description=f"Held-out metrics: {', '.join(BUILTIN_METRICS)}, or a `module:function(prediction, reference) -> float` "
        "of your own, the module found beside the recipe file that names it (or installed); `validate` imports it.",
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
    slice_by: str | None = Field(
        None,
        min_length=1,
        description="Column of the held-out rows that names each row's slice (e.g. `difficulty`); every eval figure is "
        "then reported overall and per slice, and `--require 'exact_match[hard]>=0.8'` gates one slice. A source's "
        "own `slice:` wins; a held-out row without the column is an error naming the row.",
    )
    regex: str | None = Field(
        None,
        min_length=1,
        description="The pattern the `regex` metric requires each whole (stripped) answer to match, e.g. "
        "`'[A-Z]{3}-\\d+'`; unset, each row's reference answer is the pattern.",
    )
    json_schema: Annotated[str, PathRef("file")] | None = Field(
        None,
        description="A JSON Schema file (.json), relative to the recipe: the `json_schema` metric scores 1 for an "
        "answer that is JSON valid against it (checked with the `jsonschema` package), else 0.",
    )
    harness: list[Annotated[str, Field(min_length=1), PathRef("local_or_hub")]] = Field(
        [],
        description="lm-evaluation-harness tasks run on the base and the tuned model (the adapter through lm-eval's "
        "`peft=`), results in eval/harness.json: task or group names such as `hellaswag`, or local task .yaml files "
        "or folders of them (every task inside), relative to the recipe. Needs `pip install lm-eval` and `data.eval`.",
    )
    judge: JudgeSection | None = Field(
        None,
        description="An LLM judge that `finetune eval` asks to rate the held-out answers (results in judge.json); "
        "replies cached under RUN/eval/judge-cache/, so a rerun sends nothing.",
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> EvalSection:
        for i, metric in enumerate(self.metrics):
            if metric not in BUILTIN_METRICS and ":" not in metric:
                raise FieldRuleError(
                    f"metrics[{i}]", f"unknown metric {metric!r}: use {', '.join(BUILTIN_METRICS)} or module:function"
                )
        if "json_schema" in self.metrics and self.json_schema is None:
            raise FieldRuleError("json_schema", "metric json_schema needs the schema file: set eval.json_schema")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise FieldRuleError("regex", f"not a valid regular expression: {e}") from None
        if self.judge is not None and all(m in LOSS_METRICS for m in self.metrics):
            raise FieldRuleError("judge", "rates generated answers: add a generation metric to eval.metrics")
        return self


class Recipe(Section):
    """A complete fine-tuning recipe."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX,
        description=f"Run name: letters, digits, `.`, `_`, `-`, at most {NAME_MAX} characters; output_dir defaults to "
        "runs/<name>.",
    )
    extends: str | list[str] | None = Field(
        None,
        description="Base recipe file(s), relative to this file, deep-merged in order; this file wins, lists replace.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=SEED_MAX,
        description="Seed for data order, the eval split, LoRA initialisation and dropout: 0 to 2^32 - 1.",
    )
    model: ModelSection = Field(description="The base model.")
    quantization: QuantizationSection = Field(QuantizationSection(), description="Quantization of the frozen base.")
    lora: LoraSection = Field(LoraSection(), description="The adapter.")
    data: DataSection = Field(description="Training and held-out data.")
    train: TrainSection = Field(TrainSection(), description="Optimisation.")
    eval: EvalSection = Field(EvalSection(), description="Held-out evaluation.", json_schema_extra=RESUMABLE)
    output_dir: Annotated[str, PathRef("local"), Field(min_length=1)] | None = Field(
        None,
        description="Run directory (not empty); default runs/<name> under the working directory.",
        json_schema_extra=RESUMABLE,
    )
    # Set by `finetune.recipe.load.load_recipe`, not a recipe key: the file, the --set overrides and the key locations
    # it was loaded from, for the manifest's git state, messages that name a line or the command that was run,
    # and the processes a distributed launch starts.
    _source: RecipeSource | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _method_fits(self) -> Recipe:
        method = self.train.method
        for other in OPTION_METHODS:
            if other != method and other in self.train.model_fields_set:
                raise FieldRuleError(f"train.{other}", f"options of method {other}, but train.method is {method}")
        formats = {s.format for s in self.data.train}
        if method == "grpo":
            self._grpo_fits(formats)
        if method == "dpo" and formats != {"preference"}:
            raise FieldRuleError(
                "train.method", f"dpo needs data in format preference, not {', '.join(sorted(formats))}"
            )
        if method == "kto" and not formats <= {"preference", "unpaired"}:
            raise FieldRuleError("train.method", "kto needs data in format unpaired or preference")
        if method == "kto" and self.train.kto.loss_type == "kto" and self.train.batch_size < 2:
            raise FieldRuleError(
                "train.batch_size", "must be at least 2 with kto: its KL estimate pairs batch neighbours"
            )
        if method == "sft" and "unpaired" in formats:
            raise FieldRuleError("train.method", "sft cannot train on unpaired (KTO) data: use method kto")
        for option in ("packing", "group_by_length", "padding_free"):  # batching of SFT's token sequences
            if method != "sft" and getattr(self.data, option) is True:
                raise FieldRuleError(f"data.{option}", f"applies to sft only, not train.method {method}")
        return self

    def _grpo_fits(self, formats: set[str]) -> None:
        t, o = self.train, self.train.grpo
        if o is None:
            raise FieldRuleError("train.grpo", "method grpo needs train.grpo.rewards: the functions it maximises")
        if "unpaired" in formats:
            raise FieldRuleError("train.method", "grpo reads prompts (and answers as references), not unpaired data")
        longest = self.data.max_seq_length
        if longest != "auto" and o.max_completion_length >= longest:
            raise FieldRuleError(
                "train.grpo.max_completion_length",
                f"must be less than data.max_seq_length ({longest}): the prompt and its completion share it "
                f"(got {o.max_completion_length})",
            )
        completions = t.batch_size * t.grad_accum
        if completions % o.num_generations:
            raise FieldRuleError(
                "train.batch_size",
                f"batch_size x grad_accum ({completions}) counts completions with grpo and must be a multiple of "
                f"train.grpo.num_generations ({o.num_generations}), so that every prompt's group is whole",
            )

    @model_validator(mode="after")
    def _lora_init_fits(self) -> Recipe:
        """The combinations of lora.init PEFT refuses, or that would not give a plain LoRA on the original base."""
        init, quant = self.lora.init.method, self.quantization.method
        if init in ("kaiming", "gaussian"):
            return self
        if self.model.from_run is not None:
            raise FieldRuleError("lora.init.method", "a continued run (model.from_run) trains its parent's adapter")
        if self.train.method != "sft":
            raise FieldRuleError(
                "lora.init.method",
                f"{init} applies to train.method sft only, not {self.train.method}: DPO, KTO and GRPO use the base "
                "with the adapter off as their reference",
            )
        if self.lora.variant == "dora":
            raise FieldRuleError("lora.variant", f"dora is not supported with lora.init.method {init}")
        if init == "loftq" and quant != "nf4":
            raise FieldRuleError(
                "lora.init.method",
                f"loftq initialises against an NF4 base: it needs quantization.method nf4, not {quant}",
            )
        if init in BASE_MOVING_INITS and quant != "none":
            raise FieldRuleError(
                "lora.init.method",
                f"{init} moves part of the base weights into the adapter, which a quantized base cannot hold exactly "
                f"(quantization.method {quant}); use loftq for a quantized base",
            )
        if (
            init in BASE_MOVING_INITS
            and self.lora.variant == "rslora"
            and (self.lora.rank_pattern or self.lora.alpha_pattern)
        ):
            raise FieldRuleError(  # PEFT's conversion to a plain LoRA (subtract_mutated_init) refuses this
                "lora.variant",
                f"rslora with rank_pattern/alpha_pattern cannot be saved as a plain LoRA after {init}: PEFT's "
                "conversion does not support it; drop the patterns or use variant lora",
            )
        return self

    # --- streaming (data/stream.py, issue 31 item 3) ---
    @model_validator(mode="after")
    def _streaming_fits(self) -> Recipe:
        """What a stream cannot do: it has no length (so no epochs), and its rows are never all in hand at once."""
        d, t = self.data, self.train
        for i, source in enumerate(d.eval if isinstance(d.eval, list) else []):
            if source.streaming:
                raise FieldRuleError(f"data.eval.{i}.streaming", "held-out sources are read whole; stream training "
                                     "sources only")  # fmt: skip
        streamed = [i for i, source in enumerate(d.train) if source.streaming]
        if not streamed:
            return self
        if len(streamed) < len(d.train):
            other = next(i for i in range(len(d.train)) if i not in streamed)
            raise FieldRuleError(f"data.train.{other}.streaming", "stream every training source or none")
        at = f"data.train.{streamed[0]}.streaming"
        refusals = [
            (t.max_steps is None, at, "needs train.max_steps: a stream has no length to count epochs by"),
            (t.method != "sft", at, f"streams train.method sft only, not {t.method}"),
            (isinstance(d.eval, EvalSplit), "data.eval.split_ratio",
             "cannot be drawn from a stream: give data.eval sources of their own (a list like data.train)"),
            (d.packing is True, "data.packing", "packs rows prepared up front: not with streaming sources"),
            (d.group_by_length is True, "data.group_by_length", "sorts rows prepared up front: not with streaming"),
            (d.dedup != "none", "data.dedup", "compares every row with every other: not with streaming sources"),
            (d.leakage != "warn", "data.leakage", "a stream's rows are checked on a sample only: use warn"),
            (t.distributed is not None, "train.distributed", "streaming trains in one process (not checked with more)"),
            (self.lora.init.method in ("eva", "corda"), "lora.init.method",
             f"{self.lora.init.method} reads prepared training rows: not with streaming sources"),
        ]  # fmt: skip
        for refused, field_, message in refusals:
            if refused:
                raise FieldRuleError(field_, message)
        return self

    # --- end streaming ---

    @model_validator(mode="after")
    def _new_tokens_fit(self) -> Recipe:
        """What adding tokens was verified with (SFT, a fresh adapter, the default init), and no row trained twice."""
        add = self.data.add_special_tokens
        if add == "none":
            return self
        if isinstance(add, list) and len(set(add)) != len(add):
            raise FieldRuleError("data.add_special_tokens", "lists a token twice")
        if self.train.method != "sft":
            raise FieldRuleError(
                "data.add_special_tokens", f"new tokens are trained with train.method sft only, not {self.train.method}"
            )
        if self.model.from_run is not None:
            raise FieldRuleError(
                "data.add_special_tokens", "a continued run (model.from_run) keeps its parent's tokenizer"
            )
        if self.lora.init.method not in ("kaiming", "gaussian"):
            raise FieldRuleError(
                "data.add_special_tokens",
                f"new tokens are not supported with lora.init.method {self.lora.init.method} (its conversion to a "
                "plain LoRA was not verified with new token rows); use gaussian",
            )
        embedding = [m for m in self.lora.modules_to_save if m in EMBEDDING_LAYERS]
        if embedding and self.lora.new_tokens == "trainable_rows":
            raise FieldRuleError(
                "lora.new_tokens",
                f"trainable_rows trains the new tokens' rows, but lora.modules_to_save already trains "
                f"{', '.join(embedding)} in full; set lora.new_tokens: modules_to_save",
            )
        return self

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

    def __eq__(self, other: object) -> bool:
        """Equal keys make equal recipes: where one was loaded from is provenance, not content."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = Section.__hash__

    @property
    def source(self) -> RecipeSource | None:
        """The file, overrides and key locations this recipe was loaded from (None when built in code)."""
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        """The `--set key=value` overrides applied on top of the source file."""
        return self._source.overrides if self._source else ()

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data with `extends` applied away: what runs write to recipe.yaml.

        Options that do not apply are left out (4-bit options without a 4-bit method, lora.init options of
        another initialisation), so that
        the resolved recipe validates again.
        """
        exclude: dict[str, Any] = {"extends": True}
        if self.quantization.method not in ("nf4", "fp4"):
            exclude["quantization"] = set(FOUR_BIT_OPTIONS)
        exclude["train"] = {m for m in OPTION_METHODS if m != self.train.method}  # other methods' options
        init = self.lora.init.method  # options of other initialisations
        exclude["lora"] = {"init": {o for o, methods in INIT_OPTIONS.items() if init not in methods}}
        return self.model_dump(mode="json", exclude=exclude)

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe, stable across key order."""
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()


def resumable_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys marked RESUMABLE (a section marked so counts whole): what `--resume` lets a recipe change."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        if (info.json_schema_extra or {}).get("resumable"):
            out.append(prefix + name)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += resumable_keys(info.annotation, f"{prefix}{name}.")
    return tuple(out)
