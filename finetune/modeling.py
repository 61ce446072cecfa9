"""Base model and tokenizer loading, quantization and the LoRA adapter's configuration.

Everything here follows the recipe: the hub id or local directory, the pinned revision,
safetensors only, `trust_remote_code` off unless the recipe turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import UserError
from finetune.lora_layers import peft_fields
from finetune.machine import device, resolve_dtype
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")
OUTPUT_LAYERS = ("lm_head", "embed_out", "output")


def quiet_libraries() -> None:
    """Silence progress bars and deprecation notices of transformers/PEFT/datasets that a user cannot act on.

    Notices that matter are said once, in our words: bitsandbytes' int8 cast notice (logged on
    every forward pass, 1,540 times in a short run) and PEFT's `ensure_weight_tying` one
    (`tied_output_note` says what it means for the run).
    """
    import logging
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"(?s).*ensure_weight_tying", category=UserWarning)
    # new tokens: checkpoints hold the grown embeddings in full (so a resume is exact); adapter/ holds the rows only
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True` as the embedding layer has "
                            "been resized", category=UserWarning)  # fmt: skip
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_ONCE)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class _SayOnce:
    """A logging filter that drops a repeated library notice and says it once, in our words, as a warning."""

    def __init__(self, prefix: str, ours: str) -> None:
        self.prefix, self.ours, self.said = prefix, ours, False

    def filter(self, record: Any) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if not self.said:
            import warnings

            self.said = True
            warnings.warn(self.ours, stacklevel=2)
        return False


_INT8_CAST_ONCE = _SayOnce(
    "MatMul8bitLt: inputs will be cast",
    "quantization int8: bitsandbytes runs the 8-bit matmuls in float16, so their inputs are cast to float16",
)


def tied_output_note(recipe: Recipe, model: Any) -> str | None:
    """What training the output layer in full means when it shares its weights with the input embeddings."""
    trained = [m for m in recipe.lora.modules_to_save if m in OUTPUT_LAYERS or "embed" in m]
    if not trained or not getattr(model.config, "tie_word_embeddings", False):
        return None
    return (
        f"lora.modules_to_save: {', '.join(trained)} shares its weights with the input embeddings "
        "(tie_word_embeddings); the adapter trains its own full copy, so the tuned model's input and output "
        "layers are no longer tied (finetune merge saves it untied)"
    )


def hub_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Where `from_pretrained` reads the base: the pinned revision, remote code only if the recipe allows it."""
    return {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}


def model_kwargs(recipe: Recipe, attention: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments of every full model we load: the base, and a merged model read back."""
    return {
        "dtype": dtype or resolve_dtype(recipe.model.dtype),
        "attn_implementation": attention,
        "use_safetensors": True,
        "trust_remote_code": recipe.model.trust_remote_code,
    }


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (labels are masked by us, so pad may equal eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.base, **hub_kwargs(recipe))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def quantization_config(recipe: Recipe) -> Any:
    """A transformers BitsAndBytesConfig for the recipe, or None for an unquantized base."""
    q = recipe.quantization
    if q.method == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = resolve_dtype(q.compute_dtype if q.compute_dtype != "auto" else recipe.model.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def load_model(recipe: Recipe, attention: str, quantized: bool = True) -> PreTrainedModel:
    """The base model in the recipe's dtype with the attention kernel decided by the caller (`finetune.speed`);
    quantized as the recipe says unless `quantized=False`."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(recipe) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.base,
        revision=recipe.model.revision,
        quantization_config=quant,
        device_map={"": device()} if quant is not None else None,
        **model_kwargs(recipe, attention),
    )
    if quant is None:
        model.to(device())
    return model


def prepare_quantized(recipe: Recipe, model: PreTrainedModel, checkpointing: bool) -> PreTrainedModel:
    """Ready a quantized base for training, the same way `finetune plan` lays it out.

    int8: PEFT's prepare_model_for_kbit_training (every parameter that is not quantized in float32, as
    LLM.int8() training expects). 4-bit: nothing; the embeddings, head and norms stay in `model.dtype`, as
    the plain TRL script leaves them: half the memory of float32 (2.1 GB on Llama-3.1-8B) and measured no
    worse on held-out loss (docs/measurements/speed.md, "QLoRA: the parameters that are not quantized"). A recipe that wants
    them in float32 says `model.dtype: float32` with `quantization.compute_dtype: bfloat16`.
    """
    if recipe.quantization.method != "int8":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


def weight_files(recipe: Recipe, model: torch.nn.Module) -> dict[str, Any]:
    """Provenance of the loaded weights: the hub commit they came from and the sha256 of each file.

    Hub files are content-addressed in the cache (an LFS blob's name is its sha256), so nothing
    is re-read; a local directory's files are hashed.
    """
    from pathlib import Path

    from finetune.files import file_sha256

    commit = getattr(model.config, "_commit_hash", None)
    local = Path(recipe.model.base)
    if local.is_dir():
        files = {p.name: file_sha256(p) for p in sorted(local.glob("*.safetensors"))}
        return {"commit": commit, "weights_sha256": files}
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(recipe.model.base, revision=recipe.model.revision, local_files_only=True,
                                          allow_patterns=["*.safetensors"]))  # fmt: skip
        files = {p.name: p.resolve().name for p in sorted(snapshot.glob("*.safetensors"))}
        commit = commit or snapshot.name
    except Exception:  # provenance must never fail a run
        files = {}
    return {"commit": commit, "weights_sha256": files}


def linear_modules(model: torch.nn.Module) -> dict[str, str]:
    """Full name -> leaf name of every linear layer (bitsandbytes ones included), output layer excluded."""
    out = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and leaf not in OUTPUT_LAYERS:
            out[name] = leaf
    return out


def resolve_targets(recipe: Recipe, model: torch.nn.Module) -> list[str]:
    """Leaf module names for the recipe's targets: a preset resolved from the model, or a checked list."""
    modules = linear_modules(model)
    leaves = sorted(set(modules.values()))
    targets = recipe.lora.targets
    if isinstance(targets, list):
        missing = [t for t in targets if t not in leaves and not any(n.endswith(f".{t}") for n in modules)]
        if missing:
            raise UserError(
                f"lora.targets: {', '.join(missing)} match no linear layer of {recipe.model.base}; "
                f"its linear layers are: {', '.join(leaves)}"
            )
        return list(targets)

    def parent_is(name: str, parents: tuple[str, ...]) -> bool:
        parent = name.rsplit(".", 2)[-2].lower() if "." in name else ""
        return any(p in parent for p in parents)

    wanted = {
        "attention": lambda n: parent_is(n, ATTENTION_PARENTS),
        "mlp": lambda n: parent_is(n, MLP_PARENTS),
        "all-linear": lambda n: True,
    }[targets]
    chosen = sorted({leaf for name, leaf in modules.items() if wanted(name)})
    if not chosen:
        raise UserError(
            f"lora.targets: preset {targets!r} matches no linear layer; its linear layers are: {', '.join(leaves)}"
        )
    return chosen


def lora_config(recipe: Recipe, targets: list[str]) -> LoraConfig:
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=lora.variant == "dora",
        use_rslora=lora.variant == "rslora",
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
        **peft_fields(recipe),  # per-layer ranks, alphas and blocks (finetune.lora_layers)
    )


# --- new tokens (data.add_special_tokens, lora.new_tokens; issue 33) ---


def fit_vocabulary(model: PreTrainedModel, size: int, mean: bool = False) -> bool:
    """Grow the input embeddings and the output layer to `size` rows when they hold fewer (never shrink: a
    vocabulary padded beyond the tokenizer stays as it is). `mean`: new rows drawn around the old rows' mean and
    covariance (transformers' mean_resizing, so the new tokens start as likely as an average one), as training
    does; a consumer loading a trained adapter needs no such start, the adapter holds the rows. Whether it grew."""
    if size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(size, mean_resizing=mean)
    return True


def fit_to_adapter(model: PreTrainedModel, adapter: Any) -> bool:
    """The base grown to the vocabulary of the tokenizer saved with `adapter` (a run that added tokens), before
    PEFT loads the adapter: its new rows have no place in the base's embeddings otherwise."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if not (Path(adapter) / "tokenizer_config.json").is_file():
        return False
    return fit_vocabulary(model, len(AutoTokenizer.from_pretrained(adapter)))


def embedding_names(model: PreTrainedModel) -> tuple[str, str | None]:
    """Leaf names of the input embeddings and of the output layer, None for the latter when it is tied to them."""
    modules = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    out = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False) or out is None
    return modules[id(model.get_input_embeddings())], None if tied else modules[id(out)]


def train_new_tokens(recipe: Recipe, model: PreTrainedModel, peft_config: LoraConfig, ids: list[int]) -> dict[str, Any]:
    """Make room for the tokens the tokenizer gained (`ids`) and have the adapter train them, as lora.new_tokens
    says: `trainable_rows` PEFT's trainable_token_indices on the input embeddings and an untied output layer (a
    tied one follows its embeddings), `modules_to_save` both matrices in full. What the manifest records."""
    vocabulary = max(ids) + 1
    grew = fit_vocabulary(model, vocabulary, mean=True)
    embed, output = embedding_names(model)
    layers = [embed] if output is None else [embed, output]
    if recipe.lora.new_tokens == "trainable_rows":
        peft_config.trainable_token_indices = {layer: list(ids) for layer in layers}
    else:
        peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *layers]
        peft_config.ensure_weight_tying = output is None  # a tied output layer follows the trained embeddings copy
    rows = model.get_input_embeddings().weight.shape[0]
    return {"ids": list(ids), "mode": recipe.lora.new_tokens, "layers": layers, "embedding_rows": rows,
            "resized": grew}  # fmt: skip
