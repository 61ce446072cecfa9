"""`lora.init`: how the adapter's weights start, and the conversion that keeps every saved adapter a plain LoRA.

PEFT does the initialisations (`init_lora_weights`, `initialize_lora_eva_weights`, `preprocess_corda`; LoftQ is
PEFT's `replace_lora_weights_loftq` step computed here, see `loftq`); this module builds the PEFT model with them
before the trainer sees it, and keeps the promise that `adapter/` is relative to the *original* base, whatever the
initialisation:

- pissa, olora and corda move part of each base weight into the adapter (W = W_res + B0 A0) and train on
  W_res. Their initial adapter is saved first (lora-init/initial/, with `init_lora_weights: true`, as PEFT
  documents), and each save of adapter/ is converted with `path_initial_model_for_weight_conversion`:
  delta W = B A - B0 A0 = [B | -B0] [A ; A0], a rank 2r LoRA on the untouched W (PEFT doubles r and alpha). The
  trained adapter in its own form (on W_res) is kept in lora-init/trained/ for reloading the best step into
  memory; checkpoints hold that form too, and a resumed run recomputes W_res from the original base (the
  initialisation is deterministic) and checks that it reproduced the saved initial adapter exactly.
- loftq (NF4 base) leaves the base as loaded, NF4(W): A0, B0 from the SVD of W - NF4(W), W read from the base's
  safetensors. The adapter is relative to the NF4 base, like every QLoRA adapter, and every consumer that loads the base as training did (eval, chat, serve) gets the trained model.
- eva sets A from the layer inputs on training batches and B to zero: the base is untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import UserError
from finetune.files import atomic_dir
from finetune.recipe.schema import BASE_MOVING_INITS, DATA_INITS, Recipe

if TYPE_CHECKING:
    from finetune.data import PreparedData

INIT_DIR = "lora-init"  # in the run directory: initial/ (the initial adapter), trained/ (the adapter on W_res)
IGNORE = -100


def peft_init(recipe: Recipe) -> bool | str:
    """PEFT's `init_lora_weights` for the recipe's `lora.init` (loftq starts from PEFT's default, then is replaced)."""
    init = recipe.lora.init
    if init.method == "pissa" and init.svd_iters is not None:
        return f"pissa_niter_{init.svd_iters}"
    return {"kaiming": True, "loftq": True}.get(init.method, init.method)


def moves_base(recipe: Recipe) -> bool:
    return recipe.lora.init.method in BASE_MOVING_INITS


def initial_dir(run_root: Path) -> Path:
    return run_root / INIT_DIR / "initial"


def trained_dir(run_root: Path) -> Path:
    return run_root / INIT_DIR / "trained"


def apply(
    recipe: Recipe, run_root: Path, model: Any, peft_config: Any, data: PreparedData, tokenizer: Any, resumed: bool,
    main: bool = True,
) -> tuple[Any, Any, dict[str, Any] | None]:  # fmt: skip
    """(model, peft_config for TRL, what the manifest records): the default init is left to TRL (peft_config as
    given, nothing recorded); every other one returns the PEFT model built here and no peft_config. `main`: the
    process that writes the initial adapter."""
    if recipe.lora.init.method == "kaiming" or peft_config is None:
        return model, peft_config, None
    import warnings

    from peft import get_peft_model

    # PEFT's advice to convert the adapter to a plain LoRA: save_adapter does, at every save
    warnings.filterwarnings("ignore", message=r"(?s).*(PiSSA|OLoRA|CorDA) changes the base weights")
    started = time.perf_counter()
    peft_config.init_lora_weights = peft_init(recipe)
    record: dict[str, Any] = {"method": recipe.lora.init.method, "init_lora_weights": peft_config.init_lora_weights}
    method = recipe.lora.init.method
    if method in DATA_INITS:
        batches, record["data"] = _batches(recipe, data, tokenizer, model.device)
    if method == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        peft_config.eva_config = EvaConfig(rho=recipe.lora.init.eva_rho, tau=recipe.lora.init.eva_tau)
        model = get_peft_model(model, peft_config, low_cpu_mem_usage=True)
        passes = []  # EVA cycles over the batches until every layer's components converge (tau)

        def forward(m: Any, inputs: dict) -> Any:
            passes.append(1)
            return m(**inputs)

        initialize_lora_eva_weights(model, batches, forward_fn=forward, show_progress_bar=False)
        record["data"]["forward_passes"] = len(passes)
    elif method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        peft_config.corda_config = CordaConfig(corda_method=recipe.lora.init.corda_mode)
        preprocess_corda(model, peft_config, run_model=lambda: _forward_rows(model, batches))
        model = get_peft_model(model, peft_config)
    else:
        model = get_peft_model(model, peft_config)
    if method == "loftq":
        record["layers"] = loftq(model, _safetensors_of(recipe, model))
    record["seconds"] = round(time.perf_counter() - started, 3)
    if moves_base(recipe):
        _keep_initial(model, run_root, resumed, main)
        record["conversion"] = (
            "adapter/ is converted at each save with PEFT's path_initial_model_for_weight_conversion against "
            f"{INIT_DIR}/initial: a plain LoRA of rank {2 * recipe.lora.rank} on the original base"
        )
    elif method == "loftq":
        record["conversion"] = "none: the adapter is relative to the NF4-quantized base, as training loaded it"
    else:
        record["conversion"] = "none: the base is not changed"
    return model, None, record


def _batches(recipe: Recipe, data: PreparedData, tokenizer: Any, device: Any) -> tuple[list[dict], dict[str, Any]]:
    """The first `data_batches` batches of the prepared training rows, in order, padded (labels masked on pad):
    what EVA and CorDA read. Deterministic, so that a resumed run's initialisation is the same."""
    size, wanted = recipe.train.batch_size, recipe.lora.init.data_batches
    rows = data.train.select(range(min(len(data.train), size * wanted)))
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(ids) for ids in chunk["input_ids"])
        ids = [x + [pad] * (width - len(x)) for x in chunk["input_ids"]]
        labels = [y + [IGNORE] * (width - len(y)) for y in chunk["labels"]]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x in chunk["input_ids"]]
        batches.append({k: torch.tensor(v, device=device) for k, v in
                        (("input_ids", ids), ("attention_mask", mask), ("labels", labels))})  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    used = {"rows": len(rows), "batches": len(batches), "batch_size": size, "tokens": tokens,
            "which": f"the first {len(rows)} prepared training rows, in file order"}  # fmt: skip
    return batches, used


@torch.no_grad()
def _forward_rows(model: Any, batches: list[dict]) -> None:
    """One row at a time, without its padding: CorDA's hook adds up one sequence's covariance per call."""
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            model(input_ids=ids[mask.bool()][None])


@torch.no_grad()
def loftq(model: Any, weights_dir: str, adapter: str = "default") -> dict[str, float]:
    """LoftQ's step for a base already quantized by bitsandbytes, as PEFT's `replace_lora_weights_loftq` takes
    it: for each NF4 layer, A0 and B0 from the rank-r SVD of W - NF4(W), W read from the base's safetensors.

    Two differences, both of the arithmetic's place, not its idea: it runs on the weights' own device (PEFT 0.21
    moves W to 'cuda' or 'xpu', so it cannot run on a CPU), and B0 A0 is divided by the adapter's scaling
    (alpha / r), so that the layer starts at NF4(W) + scaling B0 A0 = NF4(W) + SVD_r(W - NF4(W)); PEFT leaves the
    scaling out (huggingface/peft#1982), and at alpha = 2r that start is exactly as far from W as NF4(W) is.
    Returns, per layer, the relative error ||W - start|| / ||W - NF4(W)|| (below 1: nearer W)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    read, out = _tensor_reader(Path(weights_dir)), {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        quantized = module.get_base_layer().weight
        base = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
        error = read(name.removeprefix("base_model.model.") + ".weight").to(base.device, torch.float32) - base
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        r, scale = module.r[adapter], module.scaling[adapter]
        root = (s[:r] / scale).sqrt()
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a.data = (root[:, None] * vh[:r]).to(a.dtype)
        b.data = (u[:, :r] * root).to(b.dtype)
        left = error - scale * (b.data.float() @ a.data.float())
        out[name.removeprefix("base_model.model.")] = round(float(left.norm() / error.norm()), 4)
    if not out:
        raise UserError("lora.init.method: loftq found no NF4 layer among the adapter's targets")
    return out


def _tensor_reader(folder: Path) -> Any:
    """name -> tensor from a model directory's safetensors (sharded or not), one tensor read at a time."""
    from safetensors import safe_open

    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))

    def read(name: str) -> torch.Tensor:
        key = name if name in where else next((k for k in where if k.endswith("." + name) or name.endswith(k)), None)
        if key is None:
            raise UserError(f"lora.init.method: loftq: no weight {name} in the base's safetensors ({folder})")
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return read


def _safetensors_of(recipe: Recipe, model: Any) -> str:
    """The unquantized weights LoftQ reads (a local directory's, else the hub cache's snapshot)."""
    local = Path(recipe.model.base)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(recipe.model.base, revision=recipe.model.revision,
                                       allow_patterns=["*.safetensors", "*.json"]))  # fmt: skip
    return str(local)


def _keep_initial(model: Any, run_root: Path, resumed: bool, main: bool) -> None:
    """Save the initial adapter (as PEFT documents: `init_lora_weights: true`, so loading it moves nothing); on
    resume, check that the initialisation reproduced it, or the residual base would not be the one trained on."""
    folder = initial_dir(run_root)
    config = model.peft_config["default"]
    if resumed and folder.exists():
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file

        saved, now = load_file(folder / "adapter_model.safetensors"), get_peft_model_state_dict(model)
        if saved.keys() != now.keys() or any(not torch.equal(saved[k], now[k].cpu()) for k in saved):
            raise RuntimeError(
                f"lora.init {config.init_lora_weights}: the initialisation on resume differs from the one saved in "
                f"{folder}, so the base the checkpoints were trained on cannot be rebuilt; start the run again"
            )
        return
    if not main:
        return
    with _plain_config(model), atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)


@contextmanager
def _plain_config(model: Any) -> Iterator[None]:
    """The adapter's config says `init_lora_weights: true` while it is saved (PEFT's own advice for a converted or
    initial adapter): a reader that loads it runs no initialisation of its own on the base."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        yield
        return
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        yield
    finally:
        config.init_lora_weights = init


def save_adapter(recipe: Recipe, run_root: Path, model: Any, out: Path) -> None:
    """adapter/'s weights and config: converted to a plain LoRA on the original base when the init moved it."""
    if not moves_base(recipe):  # saved as PEFT's default init, so that loading it anywhere runs no init of its own
        # new tokens: their rows are in the adapter (trainable_token_indices or modules_to_save); PEFT would add the
        # whole resized embeddings and output layer of the base as well, on seeing the vocabulary grown
        rows_only = {"save_embedding_layers": False} if recipe.data.add_special_tokens != "none" else {}
        with _plain_config(model):
            model.save_pretrained(
                out, selected_adapters=["default"], **rows_only
            )  # not a preference method's reference
        return
    with atomic_dir(trained_dir(run_root)) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
    model.save_pretrained(out, selected_adapters=["default"],
                          path_initial_model_for_weight_conversion=str(initial_dir(run_root)))  # fmt: skip


def reload_from(recipe: Recipe, run_root: Path, adapter: Path) -> Path:
    """Where the best adapter is read back into the training model from: its own form when the base moved."""
    return trained_dir(run_root) if moves_base(recipe) else adapter
