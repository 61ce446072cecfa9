"""`finetune plan`: what a recipe will cost before any weight is read or any GPU is rented.

Reads top to bottom: check the arguments, read the model's config.json, build the model on
the meta device (shapes, no storage), lay out its dtypes as training will (bitsandbytes
quantization, modeling.prepare_quantized, TRL's adapter cast), attach the
recipe's adapter with PEFT itself (exact parameter counts), then estimate memory per
component, the work from the local data (tokenizer only), and the time on a named GPU.

Every memory term is a formula of the model's shapes and the recipe; docs/guides/plan.md states them.
The plan is for the GPU a user will rent, so `model.dtype: auto` is planned as bfloat16.
It stays one module (~800 lines) on purpose: every estimate reads the same meta model and dtype layout,
and split apart the terms would pass that state between modules instead of reading it here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune import lora_layers
from finetune.errors import Problem, UserError
from finetune.machine import PLANNED_GPU, Machine, resolve_dtype, this_machine
from finetune.modeling import hub_kwargs, load_tokenizer, lora_config, resolve_targets
from finetune.recipe.load import is_local
from finetune.recipe.preflight import TOKENIZER_FILES
from finetune.recipe.schema import Recipe
from finetune.speed import decide_checkpointing, decide_packing, decide_padding_free, model_attention

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

GB = 10**9
# Peak dense bf16 tensor throughput (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
# Common GPU memory sizes; "N GB" is read as N * 10^9 bytes, the conservative reading of the nominal size.
GPU_MEMORY_GB = (24, 40, 48, 80, 141)
QUANT_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantization: the 8-bit absmaxes get one fp32 absmax per 256 blocks
OPTIM_8BIT_BLOCK = 256  # bitsandbytes 8-bit optimizer states: one fp32 absmax per 256 values
OPTIM_8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
CUDA_CONTEXT = 1 * GB  # CUDA context, cuBLAS workspaces and kernels: not in torch.cuda.max_memory_allocated
FRAGMENTATION = 0.05  # caching-allocator slack on top of the tensors
# TRL's SFTTrainer computes the loss with a fused, chunked LM head (trl.kernels.chunked_logprob): logits exist
# only as tiles of 4096 tokens x 32768 vocabulary entries, recomputed in the backward pass
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768
# Files one of which a model directory with a tokenizer holds; without any, the directory is config-only


@dataclass
class ModuleParams:
    """Trainable parameters of one kind of module: `q_proj` (LoRA A, B and DoRA magnitudes) or a full copy."""

    name: str
    modules: int
    params: int
    kind: str  # "lora" | "dora" | "full copy (modules_to_save)"


@dataclass
class Params:
    base: int  # the base model's parameters, tied weights counted once
    trainable: int  # PEFT's trainable count (get_nb_trainable_parameters)
    total: int  # PEFT's total: base + adapter + modules_to_save copies
    trainable_share: float  # trainable / total, as PEFT prints it
    targets: list[str]
    by_module: list[ModuleParams]
    ranks: list[str]  # which modules got which rank and alpha (finetune.lora_layers.summary)


@dataclass
class MemoryTerm:
    name: str
    bytes: int | None  # None: unknown (activations without a sequence length)
    detail: str  # how the figure adds up, with the numbers


@dataclass
class GpuFit:
    """Whether the run fits a GPU of one common size, as `finetune train` would run it there."""

    memory_gb: int  # N GB = N * 10^9 bytes
    fits: bool | None  # None: unknown (activations unknown and the rest fits)
    checkpointing: bool  # `gradient_checkpointing: auto` turns checkpointing on for this GPU; `need` counts it
    need: int | None  # bytes the run holds on this GPU
    headroom: int | None  # memory_gb * 10^9 - need


@dataclass
class Memory:
    weights_dtype: str
    compute_dtype: str
    quantization: str
    micro_batch: int
    seq_length: int | None  # None: max_seq_length is `auto` and the data is not available
    gradient_checkpointing: bool | str  # "auto": the total is without it; `fits` counts it where it is needed
    terms: list[MemoryTerm]
    total: int | None  # None when the activations are unknown
    lower_bound: int  # every term but the activations
    activations_with_checkpointing: int | None
    activations_without_checkpointing: int | None
    fits: list[GpuFit]  # per common GPU size


@dataclass
class Work:
    available: bool
    note: str | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    truncated: int | None = None
    dropped: int | None = None
    max_seq_length: int | None = None
    sequences_per_epoch: int | None = None  # rows, or packed sequences with data.packing
    tokens_per_epoch: int | None = None
    trained_tokens_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    epochs: float | None = None  # epochs actually run: train.epochs, or what train.max_steps amounts to
    total_tokens: int | None = None
    mix: list[dict[str, Any]] = field(default_factory=list)  # weighted sources, per epoch (data/mix.py SourceMix)


@dataclass
class Time:
    gpu: str | None
    peak_tflops: float
    mfu: float
    flops_per_token: float
    matmul_params: int
    seconds_per_step: float | None  # an optimizer step of full-length sequences; None without a length
    total_seconds: float | None  # from the data's token count; None without local data


@dataclass
class PlanResult:
    name: str
    model: str
    architecture: str
    layers: int | None
    params: Params
    memory: Memory
    work: Work
    time: Time | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(recipe: Recipe, gpu: str | None = None, tflops: float | None = None, mfu: float = 0.4) -> PlanResult:
    """Parameters, memory per component, work and (with `gpu` or `tflops`) time for the recipe; reads no weights."""
    from finetune.lineage import continue_parent

    recipe = continue_parent(recipe)  # model.from_run: the parent's base and adapter settings
    peak, gpu_name = _peak(gpu, tflops, mfu)
    notes: list[str] = []
    if recipe.train.method == "grpo":
        notes.append("grpo: steps and tokens count num_generations completions per prompt at max_completion_length "
                     "(an upper bound); the time counts training FLOPs only, and sampling the completions usually "
                     "costs more than training on them")  # fmt: skip
    if recipe.train.method == "dpo":
        notes.append("dpo: each pair is two sequences (chosen, rejected), each also run through the frozen reference "
                     "(forward only, no activations kept); counted in activations, steps and time")  # fmt: skip
    config = _load_config(recipe)
    shapes = _Shapes.of(config)
    weights_dtype, compute_dtype = _dtypes(recipe, PLANNED_GPU)
    if recipe.model.dtype == "auto":
        notes.append("model.dtype auto is planned as bfloat16: the plan is for the GPU you will rent, not this machine")
    model = _meta_model(recipe, config, weights_dtype)
    layout = _layout(recipe, model)
    attention = model_attention(recipe, this_machine())
    work = _work(recipe, decide_packing(recipe.data.packing, None))
    seq_length = _sequence_length(recipe, work)
    memory = _memory(recipe, layout, shapes, compute_dtype, weights_dtype, seq_length, attention)
    if seq_length is None:
        notes.append("data.max_seq_length is auto and the data is not available: activations are unknown")
    elif not shapes.complete():
        notes.append("the config does not give every dimension the activation formula needs: activations unknown")
    if "auto" in (recipe.model.attn_implementation, recipe.data.padding_free):
        flat = decide_padding_free(recipe.data.padding_free, attention)
        notes.append(
            f"attention auto is planned as {attention}, padding-free batches as {'on' if flat else 'off'} "
            "(this machine); with flash-attn on the GPU both turn on (the steps stay the same)"
        )
    if recipe.data.add_special_tokens != "none":
        notes.append(
            "data.add_special_tokens: the new tokens' rows are not counted above (lora.new_tokens trainable_rows: "
            "hidden size x new tokens per embedding matrix; modules_to_save: the embeddings and output layer in "
            "full); `finetune train` records them in the manifest (new_tokens)"
        )
    if recipe.train.optimizer.startswith("paged_"):
        notes.append("paged optimizer: its states can move to CPU memory under pressure; counted here on the GPU")
    how, n, _ = sharding(recipe)
    notes.append(f"per GPU, {how} over {n} process(es); activations are an estimate, not yet calibrated on a GPU")
    time = None
    if peak is not None:
        time = _time(recipe, layout, work, seq_length, gpu_name, peak, mfu)
    return PlanResult(
        name=recipe.name,
        model=recipe.model.base,
        architecture=(config.architectures or [type(model).__name__])[0],
        layers=shapes.layers,
        params=layout.params,
        memory=memory,
        work=work,
        time=time,
        notes=notes,
    )


def adapter_ranks(recipe: Recipe) -> list[str]:
    """Which modules get which rank and alpha (`finetune data` prints it when the recipe shapes them per layer),
    from the model's config on the meta device: no weights read."""
    from finetune.lineage import continue_parent

    recipe = continue_parent(recipe)
    model = _meta_model(recipe, _load_config(recipe), torch.bfloat16)
    return lora_layers.summary(lora_layers.check(recipe, model, lora_config(recipe, resolve_targets(recipe, model))))


def peak_memory(
    recipe: Recipe, config: PretrainedConfig, seq_length: int, attention: str, machine: Machine
) -> int | None:
    """Bytes at the training peak without gradient checkpointing, from what `finetune train` already holds.

    The same estimate as `plan`'s memory table, for the model config train loaded, the sequence
    length its data preparation settled on, the attention kernel it decided and its machine's dtypes;
    it reads no data and no tokenizer. None where the config lacks a dimension the activations need.
    """
    weights_dtype, compute_dtype = _dtypes(recipe, machine)
    layout = _layout(recipe, _meta_model(recipe, config, weights_dtype))
    memory = _memory(recipe, layout, _Shapes.of(config), compute_dtype, weights_dtype, seq_length, attention)
    without = memory.activations_without_checkpointing
    return None if without is None else memory.lower_bound + without


# --- arguments and config ---------------------------------------------------------------------


def _peak(gpu: str | None, tflops: float | None, mfu: float) -> tuple[float | None, str | None]:
    """Peak TFLOP/s from --tflops or a known GPU name; None when neither is given."""
    if not 0 < mfu <= 1:
        raise UserError(Problem(f"must be in (0, 1], got {mfu}", key="--mfu"))
    if tflops is not None and tflops <= 0:
        raise UserError(Problem(f"must be > 0, got {tflops}", key="--tflops"))
    name = None
    if gpu is not None:
        wanted = _gpu_key(gpu)
        name = next((known for known in GPU_TFLOPS if _gpu_key(known) == wanted), None)
        if name is None:
            known = ", ".join(GPU_TFLOPS)
            raise UserError(Problem(f"unknown GPU {gpu!r}: use one of {known}, or give --tflops", key="--gpu"))
    if tflops is not None:
        return tflops, name
    return (GPU_TFLOPS[name], name) if name else (None, None)


def _gpu_key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum()).removeprefix("nvidia").removeprefix("geforce")


def _load_config(recipe: Recipe) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(recipe.model.base, **hub_kwargs(recipe))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            Problem(
                f"cannot read the config.json of {recipe.model.base!r} ({reason}). `plan` needs only that file: "
                "when the hub is not reachable, pass a local directory holding it, e.g. "
                "--set model.base=path/to/model-dir (and set HF_HUB_OFFLINE=1 to skip the hub's retries)",
                key="model.base",
            )
        ) from None


def _four_bit(recipe: Recipe) -> bool:
    return recipe.quantization.method in ("nf4", "fp4")


def _dtypes(recipe: Recipe, machine: Machine) -> tuple[torch.dtype, torch.dtype]:
    """Weights and compute dtype on `machine` (for `plan`, the GPU it plans for: `auto` is bfloat16 there)."""
    weights = resolve_dtype(recipe.model.dtype, machine)
    compute = weights
    if _four_bit(recipe) and recipe.quantization.compute_dtype != "auto":
        compute = resolve_dtype(recipe.quantization.compute_dtype, machine)
    return weights, compute


@dataclass
class _Shapes:
    """The transformer's dimensions from its config; None where the config does not say."""

    layers: int | None
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate: int | None
    vocab: int | None

    @classmethod
    def of(cls, config: PretrainedConfig) -> _Shapes:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def get(name: str) -> int | None:
            value = getattr(text, name, None)
            return value if isinstance(value, int) else None

        heads, hidden = get("num_attention_heads"), get("hidden_size")
        head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
        return cls(
            get("num_hidden_layers"),
            hidden,
            heads,
            get("num_key_value_heads") or heads,
            head_dim,
            get("intermediate_size"),
            get("vocab_size"),
        )

    def complete(self) -> bool:
        return None not in (self.layers, self.hidden, self.heads, self.head_dim, self.intermediate, self.vocab)


# --- the model on the meta device, laid out as training lays it out ---------------------------


def _meta_model(recipe: Recipe, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)


@dataclass
class _Adapted:
    """One linear layer with an adapter."""

    in_features: int
    out_features: int
    rank: int


@dataclass
class _Layout:
    params: Params
    base_weights: int  # bytes
    weights_detail: str  # how base_weights adds up, with the figures
    largest_quantized: int  # numel of the largest quantized weight (dequantized one at a time)
    matmul_params: int  # base parameters that enter matmuls: all but the input embedding table
    output_params: int  # the output layer's weight
    head_dtype: torch.dtype | None  # dtype of the output weight the loss reads (the trained copy, if any)
    head_trained: bool  # the output layer is in modules_to_save
    trainable: list[tuple[str, torch.Size, torch.dtype]]  # every trainable tensor as training holds it
    adapted: list[_Adapted]


def _layout(recipe: Recipe, model: PreTrainedModel) -> _Layout:
    """Quantize (in bookkeeping), cast and attach the adapter exactly as `finetune train` does, on meta tensors."""
    from peft import get_peft_model

    method = recipe.quantization.method
    targets = resolve_targets(recipe, model)
    quantized = _quantized_weights(model) if method != "none" else {}
    base_params = dict(model.named_parameters())  # tied weights appear once
    base = sum(p.numel() for p in base_params.values())
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    output_weight = output.weight if output is not None else None
    matmul = base - (embedding.weight.numel() if embedding is not None and not tied else 0)
    if method == "int8":
        # modeling.prepare_quantized: on int8, every 16-bit parameter that is not quantized goes to fp32
        for p in base_params.values():
            if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)
    packed = [p for p in base_params.values() if id(p) in quantized]
    plain = [p for p in base_params.values() if id(p) not in quantized]
    packed_bytes = sum(_quantized_bytes(p.numel(), p.shape[0], recipe) for p in packed)
    packed_params = sum(p.numel() for p in packed)
    weights = packed_bytes + sum(p.numel() * p.element_size() for p in plain)
    detail = _by_dtype([("", p.shape, p.dtype) for p in plain])
    if packed:
        detail = f"{_si(packed_params)} x {packed_bytes / packed_params:.3f} B ({method}) + {detail}"
    largest = max((p.numel() for p in packed), default=0)

    with warnings.catch_warnings():  # deprecations inside transformers/PEFT that a user cannot act on
        warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
        config = lora_config(recipe, targets)
        ranks = lora_layers.summary(lora_layers.check(recipe, model, config))  # located errors before PEFT runs
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    if method != "none":
        # TRL's SFTTrainer casts the trainable parameters of a quantized model to bf16, DoRA magnitudes excepted
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_magnitude_vector" not in name:
                p.data = p.data.to(torch.bfloat16)
    trainable, total = peft_model.get_nb_trainable_parameters()
    head = peft_model.get_output_embeddings()
    head = head.weight if head is not None else None  # modules_to_save: the trained copy
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    adapted = [
        _Adapted(m.in_features, m.out_features, m.r[m.active_adapters[0]])
        for m in peft_model.modules()
        if hasattr(m, "lora_A") and hasattr(m, "in_features") and m.active_adapters
    ]
    params = Params(
        base=base,
        trainable=trainable,
        total=total,
        trainable_share=trainable / total if total else 0.0,
        targets=targets,
        by_module=_by_module(named, recipe.lora.variant),
        ranks=ranks,
    )
    return _Layout(
        params=params,
        base_weights=weights,
        weights_detail=detail,
        largest_quantized=largest,
        matmul_params=matmul,
        output_params=output.weight.numel() if output is not None else 0,
        head_dtype=head.dtype if head is not None else None,
        head_trained=head is not None and head is not output_weight,
        trainable=[(n, p.shape, p.dtype) for n, p in named],
        adapted=adapted,
    )


def _quantized_weights(model: PreTrainedModel) -> dict[int, str]:
    """id -> name of the weights bitsandbytes quantizes: every nn.Linear but the output layer and fp32-kept modules."""
    output = model.get_output_embeddings()
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and module is not output and not any(k in name for k in keep):
            out[id(module.weight)] = name
    return out


def _quantized_bytes(numel: int, rows: int, recipe: Recipe) -> int:
    """Bytes of one quantized weight: packed values and the quantization constants bitsandbytes stores."""
    if recipe.quantization.method == "int8":
        return numel + 4 * rows  # int8 values + one fp32 scale per output row
    blocks = math.ceil(numel / QUANT_BLOCK)
    packed = math.ceil(numel / 2)  # two 4-bit values per byte
    if not recipe.quantization.double_quant:
        return packed + 4 * blocks + 16 * 4  # fp32 absmax per block + the 16-entry code
    # 8-bit absmax per block, an fp32 absmax per 256 blocks, the 256-entry fp32 code and an fp32 offset
    return packed + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 256 * 4 + 4 + 16 * 4


def _by_module(named: list[tuple[str, torch.nn.Parameter]], variant: str) -> list[ModuleParams]:
    """Trainable parameters grouped by the module's leaf name (`q_proj`) or as full copies (`lm_head`)."""
    groups: dict[tuple[str, str], tuple[set[str], int]] = {}
    for name, p in named:
        if ".modules_to_save." in name:
            path = name.split(".modules_to_save.")[0]
            key = (path.rsplit(".", 1)[-1], "full copy (modules_to_save)")
        else:
            path = name.split(".lora_")[0]
            key = (path.rsplit(".", 1)[-1], "dora" if variant == "dora" else "lora")
        paths, count = groups.get(key, (set(), 0))
        paths.add(path)
        groups[key] = (paths, count + p.numel())
    return [ModuleParams(name, len(paths), count, kind) for (name, kind), (paths, count) in groups.items()]


# --- memory -------------------------------------------------------------------------------------


def _uses_reference(recipe: Recipe) -> bool:
    """Whether training scores with a reference model: DPO and KTO always, GRPO only with beta > 0 (with beta 0
    TRL computes no KL, so it neither loads a reference nor runs one)."""
    if recipe.train.method == "sft":
        return False
    return recipe.train.method != "grpo" or recipe.train.grpo.beta > 0


def _frozen_reference(recipe: Recipe) -> bool:
    """Whether training holds a frozen copy of the parent's adapter (from the base, the reference is the base
    itself with the adapter disabled: no extra memory)."""
    return bool(recipe.model.from_run) and _uses_reference(recipe)


def _sequence_length(recipe: Recipe, work: Work) -> int | None:
    """The longest sequence a micro-batch holds, for activations: `data.max_seq_length`, except where the data
    counted says otherwise (`auto`, and GRPO, whose sequences are at most the longest prompt plus
    max_completion_length), so the memory header and the work section give one length."""
    if recipe.data.max_seq_length == "auto" or (recipe.train.method == "grpo" and work.max_seq_length):
        return work.max_seq_length
    return recipe.data.max_seq_length


def _memory(
    recipe: Recipe,
    layout: _Layout,
    shapes: _Shapes,
    compute: torch.dtype,
    weights_dtype: torch.dtype,
    seq_length: int | None,
    attention: str,
) -> Memory:
    method, optimizer_name = recipe.quantization.method, recipe.train.optimizer
    e = _size(compute)
    adapter = sum(math.prod(shape) * _size(dtype) for _, shape, dtype in layout.trainable)
    optimizer = sum(_optimizer_bytes(shape, dtype, optimizer_name) for _, shape, dtype in layout.trainable)
    with_ckpt = without_ckpt = None
    if seq_length is not None and shapes.complete():
        with_ckpt, without_ckpt = _activations(recipe, layout, shapes, e, _size(weights_dtype), seq_length, attention)
    checkpointing = recipe.train.gradient_checkpointing  # `auto`: the figures without, `fits` allows for it
    activations = with_ckpt if checkpointing is True else without_ckpt
    if activations is not None and recipe.train.method == "dpo":
        activations *= 2  # a micro-batch of pairs is 2 x batch_size sequences: chosen then rejected
    transient = layout.largest_quantized * e  # one layer's weight dequantized for its matmul
    if recipe.lora.variant == "dora":  # DoRA's weight norm builds W + BA, one layer at a time
        transient += 2 * max((a.in_features * a.out_features for a in layout.adapted), default=0) * e
    reference = adapter if _frozen_reference(recipe) else 0  # the frozen "ref" copy of the parent's adapter
    tensors = layout.base_weights + 2 * adapter + reference + optimizer + (activations or 0)
    overhead = CUDA_CONTEXT + transient + round(FRAGMENTATION * tensors)

    n_trainable = sum(math.prod(shape) for _, shape, _ in layout.trainable)
    tokens = recipe.train.batch_size * (seq_length or 0)
    per_token = f"{activations / tokens / 1e6:.2f} MB" if activations and tokens else "?"
    ckpt = "with" if checkpointing is True else "without"
    terms = [
        MemoryTerm("base weights", layout.base_weights, layout.weights_detail),
        MemoryTerm("adapter weights", adapter, _by_dtype(layout.trainable)),
        MemoryTerm("gradients", adapter, "one per trainable param, in its dtype"),
        *([MemoryTerm("reference adapter", reference, "frozen copy of the parent's adapter")] if reference else []),
        MemoryTerm(
            "optimizer state",
            optimizer,
            f"{_si(n_trainable)} x {optimizer / max(n_trainable, 1):.2f} B ({optimizer_name})",
        ),
        MemoryTerm(
            "activations",
            activations,
            f"{recipe.train.batch_size} x {seq_length or '?'} tokens x {per_token} ({ckpt} checkpointing)",
        ),
        MemoryTerm(
            "overhead",
            overhead,
            f"{CUDA_CONTEXT / GB:g} GB CUDA context + {transient / GB:.2f} GB transient weights "
            f"+ {FRAGMENTATION:.0%} of the rest",
        ),
    ]
    _shard(terms, recipe)
    lower = sum(t.bytes for t in terms if t.bytes is not None and t.name != "activations")
    total = None if activations is None else lower + activations
    fits = [_fit(size, checkpointing, total, lower, with_ckpt) for size in GPU_MEMORY_GB]
    return Memory(
        weights_dtype=_dtype_name(weights_dtype) if method == "none" else method,
        compute_dtype=_dtype_name(compute),
        quantization=method,
        micro_batch=recipe.train.batch_size,
        seq_length=seq_length,
        gradient_checkpointing=checkpointing,
        terms=terms,
        total=total,
        lower_bound=lower,
        activations_with_checkpointing=with_ckpt,
        activations_without_checkpointing=without_ckpt,
        fits=fits,
    )


def _fit(size: int, checkpointing: bool | str, total: int | None, lower: int, with_ckpt: int | None) -> GpuFit:
    """A GPU of `size` GB: checkpointing turns on where `finetune train` would turn it on (`decide_checkpointing`)."""
    gpu = Machine(cuda=True, bf16=True, gpu_bytes=size * GB, flash_attn=False, liger_kernel=False)
    auto_on = checkpointing == "auto" and with_ckpt is not None and decide_checkpointing("auto", gpu, total)
    need = lower + with_ckpt if auto_on else total
    if need is None:
        return GpuFit(size, False if lower > size * GB else None, False, None, None)
    return GpuFit(size, need <= size * GB, auto_on, need, size * GB - need)


def sharding(recipe: Recipe) -> tuple[str, int, tuple[str, ...]]:
    """From `train.distributed`'s accelerate config: the strategy, the process count, the terms it shards."""
    if not recipe.train.distributed:
        return "single process", 1, ()
    import yaml

    config = yaml.safe_load(Path(recipe.train.distributed).read_text(encoding="utf-8")) or {}
    n = int(config.get("num_processes", 1)) * int(config.get("num_machines", 1) or 1)
    kind = str(config.get("distributed_type", "NO"))
    states = ("gradients", "optimizer state")
    if kind == "FSDP":
        return "FSDP full shard", n, ("base weights", "adapter weights", *states)
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        sharded = {1: ("optimizer state",), 2: states, 3: ("base weights", "adapter weights", *states)}
        return f"DeepSpeed ZeRO-{stage}", n, sharded.get(stage, ())
    return "data parallel (replicated)", n, ()


def _shard(terms: list[MemoryTerm], recipe: Recipe) -> None:
    """Per-GPU memory: divide what the strategy shards across its processes."""
    how, n, sharded = sharding(recipe)
    for term in terms:
        if term.name in sharded and term.bytes is not None and n > 1:
            term.bytes = math.ceil(term.bytes / n)
            term.detail += f"; / {n} GPUs ({how})"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _by_dtype(tensors: list[tuple[str, torch.Size, torch.dtype]]) -> str:
    """`41.9M x 2 B (bfloat16) + 1.4M x 4 B (float32)`: trainable params grouped by dtype."""
    counts: dict[torch.dtype, int] = {}
    for _, shape, dtype in tensors:
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return " + ".join(f"{_si(n)} x {_size(d)} B ({_dtype_name(d)})" for d, n in counts.items())


def _optimizer_bytes(shape: torch.Size, dtype: torch.dtype, optimizer: str) -> int:
    """Optimizer state of one trainable tensor, as the optimizer allocates it."""
    n, z = math.prod(shape), _size(dtype)
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * n * z  # exp_avg and exp_avg_sq, in the param's dtype
    if optimizer == "paged_adamw_32bit":
        return 2 * n * 4
    if optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        if n < OPTIM_8BIT_MIN_SIZE:
            return 2 * n * 4
        return 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
    if optimizer == "adafactor":
        if len(shape) >= 2:  # factored second moment: one value per row and per column; no first moment
            return (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * z
        return n * z
    if optimizer == "sgd":
        return 0  # no momentum
    raise ValueError(f"no memory rule for optimizer {optimizer!r}")


def _activations(recipe: Recipe, layout: _Layout, s: _Shapes, e: int, w: int, seq: int, attn: str) -> tuple[int, int]:
    """Bytes alive at the peak of the backward pass, with and without gradient checkpointing.

    `e` is the compute dtype's size; `w` the weights'; `r` the residual stream's, the dtype the
    embeddings and norms are held in (the MLP's outputs between the quantized matmuls have it too):
    4 on an int8 base (modeling.prepare_quantized keeps them in fp32), else `w`. Per token and
    decoder layer: the two RMSNorm inputs in fp32 (2 * 4h); rotated q, k, v and the attention
    output (e * (2q + 2kv); kv at the full head count, as transformers repeats it for SDPA and
    eager, at the kv heads for flash attention)
    and the log-sum-exp (4 * heads); the MLP's gate, up and activation (3 * r * i); eager
    attention adds its probabilities ((4 + e) * heads * s). Per adapted linear: its input as the
    LoRA path keeps it (e * in), the dropout mask (1 byte per input value when dropout > 0), the
    rank-r intermediate (e * r), and for DoRA the base and LoRA outputs (2 * e * out). Outside
    the layers, per token: the final norm's fp32 input (4h), the hidden state the fused loss
    keeps and its gradient (r * h + 4h + r * h), and its fp32 statistics (32 bytes). TRL's fused
    LM head never builds the full logits: add one tile of min(tokens, 4096) x min(V, 32768)
    logits in the compute dtype, the weight tile's cast when the head is not in that dtype,
    and a trained head's fp32 gradient (4 * V * h). Checkpointing keeps each layer's input
    (r * h) and recomputes one layer at a time.
    """
    r = 4 if recipe.quantization.method == "int8" else w
    h, q = s.hidden, s.heads * s.head_dim
    kv_heads = s.kv_heads if attn.startswith("flash") else s.heads
    kv = kv_heads * s.head_dim
    layer = 2 * 4 * h + e * (2 * q + 2 * kv) + 4 * s.heads + 3 * r * s.intermediate
    if attn == "eager":
        layer += (4 + e) * s.heads * seq
    mask = 1 if recipe.lora.dropout > 0 else 0
    adapters = sum((e + mask) * a.in_features + e * a.rank for a in layout.adapted)
    if recipe.lora.variant == "dora":
        adapters += sum(2 * e * a.out_features for a in layout.adapted)
    outside = 8 * h + 2 * r * h + 32
    tokens = recipe.train.batch_size * seq
    vocab_tile = min(s.vocab, HEAD_VOCAB_TILE)
    head = min(tokens, HEAD_TOKEN_TILE) * vocab_tile * e
    if layout.head_dtype is not None and _size(layout.head_dtype) != e:
        head += vocab_tile * h * e  # the weight tile cast to the compute dtype
    if layout.head_trained:
        head += 4 * layout.output_params  # the fp32 gradient accumulator of a trained output layer
    without = tokens * (s.layers * layer + adapters + outside) + head
    with_ = tokens * (s.layers * r * h + layer + adapters / s.layers + outside) + head
    return round(with_), round(without)


# --- work and time ------------------------------------------------------------------------------


def _work(recipe: Recipe, packed: bool) -> Work:
    """Rows, tokens and optimizer steps from the local data and the real tokenizer; a note where unavailable."""
    from finetune.data import prepare_data

    data = recipe.data
    all_sources = list(data.train) + (list(data.eval) if isinstance(data.eval, list) else [])
    remote = [s.path for s in all_sources if not is_local(s.path)]
    if remote:
        return Work(False, f"data not available locally: {', '.join(remote)} (hub datasets are not downloaded by plan)")
    tokenizer, note = _tokenizer(recipe)
    if tokenizer is None:
        return Work(False, note)
    import datasets

    datasets.disable_progress_bars()
    if recipe.train.method == "grpo":
        return _prompt_work(recipe, tokenizer)
    if recipe.train.method != "sft":
        return _preference_work(recipe, tokenizer)
    if any(s.streaming for s in data.train):
        return _stream_work(recipe, tokenizer)
    prepared = prepare_data(recipe, tokenizer)
    stats = prepared.stats
    sequences = stats.train_rows
    if packed:
        from trl.data_utils import pack_dataset

        sequences = len(pack_dataset(prepared.train.select_columns(["input_ids", "labels"]), stats.max_seq_length))
    return _counted_work(recipe, stats, sequences, sequences, stats.train_tokens, stats.trained_tokens)


def _stream_work(recipe: Recipe, tokenizer: Any) -> Work:
    """A stream has no length: the run is train.max_steps steps of batch_size x grad_accum rows, its tokens
    estimated from the sample the statistics are of (data/stream.py)."""
    from finetune.data.stream import prepare_stream

    stats = prepare_stream(recipe, tokenizer).stats
    t = recipe.train
    rows = (t.max_steps or 0) * t.batch_size * t.grad_accum
    work = _counted_work(recipe, stats, rows, rows, round(stats.train_tokens / stats.train_rows * rows),
                         round(stats.trained_tokens / stats.train_rows * rows))  # fmt: skip
    work.note = (f"streaming: 'per epoch' is the whole run ({rows:,} rows), its tokens estimated from "
                 f"{stats.sample['note']}")  # fmt: skip
    return work


def _counted_work(recipe: Recipe, stats: Any, batched: int, sequences: int, tokens: int, trained: int) -> Work:
    """Steps, epochs and tokens of a run whose data is counted: `batched` items per epoch (rows, packed sequences,
    or preference pairs) make the micro-batches; `sequences`, `tokens` and `trained` are one epoch's model inputs."""
    t = recipe.train
    steps_per_epoch = max(math.ceil(math.ceil(batched / t.batch_size) / t.grad_accum), 1)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    epochs = total_steps / steps_per_epoch if t.max_steps else t.epochs
    return Work(
        available=True,
        train_rows=stats.train_rows,
        eval_rows=stats.eval_rows,
        truncated=stats.truncated,
        dropped=stats.dropped,
        max_seq_length=stats.max_seq_length,
        sequences_per_epoch=sequences,
        tokens_per_epoch=tokens,
        trained_tokens_per_epoch=trained,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        total_tokens=round(tokens * epochs),
        mix=list((getattr(stats, "mix", None) or {}).get("sources", [])),
    )


def _preference_work(recipe: Recipe, tokenizer: Any) -> Work:
    """DPO: a pair is two sequences (prompt+chosen, prompt+rejected); KTO: one sequence per judged completion."""
    from finetune.data.preference import prepare_preference

    prepared = prepare_preference(recipe, tokenizer)
    stats, train = prepared.stats, prepared.train
    if stats.paired:
        sides = [len(p) + len(c) for p, c in zip(train["prompt_ids"], train["chosen_ids"], strict=True)]
        sides += [len(p) + len(r) for p, r in zip(train["prompt_ids"], train["rejected_ids"], strict=True)]
        trained = sum(map(len, train["chosen_ids"])) + sum(map(len, train["rejected_ids"]))
    else:
        sides = [len(p) + len(c) for p, c in zip(train["prompt_ids"], train["completion_ids"], strict=True)]
        trained = sum(map(len, train["completion_ids"]))
    return _counted_work(recipe, stats, stats.train_rows, len(sides), sum(sides), trained)


def _prompt_work(recipe: Recipe, tokenizer: Any) -> Work:
    """GRPO: `num_generations` completions per prompt, each at most prompt + max_completion_length tokens (an upper
    bound: completions that stop early are shorter); batch_size counts completions."""
    from finetune.data.prompts import prepare_prompts

    stats = prepare_prompts(recipe, tokenizer).stats
    n, budget = recipe.train.grpo.num_generations, recipe.train.grpo.max_completion_length
    completions = stats.train_rows * n
    tokens = n * (stats.prompt_tokens + stats.train_rows * budget)
    return _counted_work(recipe, stats, completions, completions, tokens, completions * budget)


def _tokenizer(recipe: Recipe) -> tuple[Any, str | None]:
    """The tokenizer, or why there is none: a config-only directory or an offline hub id is planned without it."""
    base = Path(recipe.model.base)
    skipped = "chat template and work skipped"
    if base.is_dir() and not any((base / name).exists() for name in TOKENIZER_FILES):
        return None, f"{base} has no tokenizer files (config only): {skipped}"
    try:
        tokenizer = load_tokenizer(recipe)
    except Exception as e:  # any failure to load a tokenizer means: no work section, said plainly
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"tokenizer of {recipe.model.base} could not be loaded offline ({reason}); {skipped}"
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers can build an empty one from a config
        return None, f"tokenizer of {recipe.model.base} has no vocabulary: {skipped}"
    return tokenizer, None


def _time(
    recipe: Recipe, layout: _Layout, work: Work, seq: int | None, gpu: str | None, peak: float, mfu: float
) -> Time:
    """FLOPs per token with a frozen base: forward 2N + backward through the activations 2N (+2N to recompute).

    TRL's fused loss also recomputes the output layer's logits in the backward pass: + 2 * V * h.
    """
    n = layout.matmul_params
    flops = (4 + (2 if recipe.train.gradient_checkpointing is True else 0)) * n + 2 * layout.output_params
    if _uses_reference(recipe):
        flops += 2 * n  # the reference's forward pass over the same tokens
    rate = peak * 1e12 * mfu
    sequences = 2 if recipe.train.method == "dpo" else 1  # chosen and rejected
    step_tokens = sequences * recipe.train.batch_size * recipe.train.grad_accum * (seq or 0)  # packed: full sequences
    return Time(
        gpu=gpu,
        peak_tflops=peak,
        mfu=mfu,
        flops_per_token=float(flops),
        matmul_params=n,
        seconds_per_step=step_tokens * flops / rate if seq else None,
        total_seconds=work.total_tokens * flops / rate if work.total_tokens is not None else None,
    )
