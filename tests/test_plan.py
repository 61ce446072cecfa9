"""`finetune plan`: exact parameter counts (against PEFT on real models), memory arithmetic, work, time, CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
from preference_runs import parent  # noqa: F401  (a completed SFT run to continue: a fixture)
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UserError
from finetune.plan import GB, GPU_TFLOPS, _quantized_bytes, plan
from finetune.recipe.load import load_recipe

ROOT = Path(__file__).parent.parent
CONFIGS = Path(__file__).parent / "support" / "fixtures" / "configs"
VARIANTS = {
    "lora": [],
    "dora": ["lora.variant=dora"],
    "rslora": ["lora.variant=rslora"],
    "modules_to_save": ["lora.modules_to_save=[lm_head]"],
}
# Published totals (the models' safetensors metadata); trainable: rank 16 on all seven projections
PUBLISHED = {
    "llama-3.1-8b": (8_030_261_248, 41_943_040),
    "mistral-7b-v0.3": (7_248_023_552, 41_943_040),
    "qwen2.5-7b": (7_615_616_512, 40_370_176),
}
SEVEN = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def write_recipe(tmp_path: Path, base: Path | str, rows: int = 8, extra: str = "") -> Path:
    tiny.write_jsonl(tmp_path / "data" / "train.jsonl", tiny.reverse_rows(rows))
    body = f"""\
        name: tiny-plan
        model: {{base: {base}}}
        lora: {{rank: 8, alpha: 16}}
        data:
          train: [{{path: data/train.jsonl}}]
          eval: {{split_ratio: 0.25}}
          max_seq_length: 64
        train: {{epochs: 2, batch_size: 4, grad_accum: 2}}
    """
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(body) + extra)
    return path


def fixture_recipe(name: str, recipe: str, *overrides: str):
    """A shipped GPU recipe with its model replaced by a config-only fixture directory."""
    return load_recipe(ROOT / "recipes" / recipe, [f"model.base={CONFIGS / name}", *overrides])


@functools.cache
def planned(name: str, recipe: str, *overrides: str):
    """The plan of a fixture recipe, computed once per session (several tests read the same one)."""
    return plan(fixture_recipe(name, recipe, *overrides))


def term(result, name: str) -> int | None:
    return next(t.bytes for t in result.memory.terms if t.name == name)


# --- parameter counts: exact, against PEFT on the real (tiny, random) model ---------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_counts_equal_peft_on_the_real_model(family, variant, tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from finetune.modeling import load_model, lora_config, resolve_targets

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(family)), VARIANTS[variant])
    planned = plan(recipe).params
    model = load_model(recipe, "sdpa")
    base = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, lora_config(recipe, resolve_targets(recipe, model)))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (planned.base, planned.trainable, planned.total) == (base, trainable, total)
    assert sum(m.params for m in planned.by_module) == trainable
    if variant == "modules_to_save":
        copy = next(m for m in planned.by_module if m.name == "lm_head")
        assert copy.params == model.get_output_embeddings().weight.numel()


# (recipe overrides, the same adapter in PEFT's own LoraConfig fields, the expected rank summary)
STRUCTURES = {
    "rank-pattern": (
        ["lora.rank_pattern={v_proj: 2, 'layers\\.1\\.mlp\\.down_proj': 32}"],
        {"rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 32}},
        ["rank 32, alpha 16: down_proj (block 1)",
         "rank 8, alpha 16: q_proj, k_proj, o_proj, gate_proj, up_proj (blocks 0-1); down_proj (block 0)",
         "rank 2, alpha 16: v_proj (blocks 0-1)"],
    ),
    "alpha-and-layers": (
        ["lora.alpha_pattern={o_proj: 4}", "lora.layers=[1]", "lora.targets=attention"],
        {"alpha_pattern": {"o_proj": 4}, "layers_to_transform": [1],
         "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"]},
        ["rank 8, alpha 16: q_proj, k_proj, v_proj (block 1)", "rank 8, alpha 4: o_proj (block 1)"],
    ),
    "layers-and-ranks": (
        ["lora.layers=[0]", "lora.rank_pattern={'q_proj|k_proj': 1}", "lora.modules_to_save=[lm_head]"],
        {"layers_to_transform": [0], "rank_pattern": {"q_proj|k_proj": 1}, "modules_to_save": ["lm_head"]},
        ["rank 8, alpha 16: v_proj, o_proj, gate_proj, up_proj, down_proj (block 0)",
         "rank 1, alpha 16: q_proj, k_proj (block 0)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("structure", STRUCTURES)
def test_per_layer_structure_counts_equal_peft_and_the_summary_says_which_rank(structure, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    overrides, fields, ranks = STRUCTURES[structure]
    model_dir = tiny_model_dir("llama")
    planned = plan(load_recipe(write_recipe(tmp_path, model_dir), overrides)).params
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": seven, "task_type": "CAUSAL_LM", **fields})
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    assert (planned.trainable, planned.total) == peft_model.get_nb_trainable_parameters()
    assert planned.ranks == ranks


def test_a_pattern_or_block_that_matches_nothing_is_a_located_error(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_model_dir("llama"), extra="")
    path.write_text(path.read_text().replace("lora: {rank: 8, alpha: 16}",
                                             "lora: {rank: 8, alpha: 16, alpha_pattern: {vproj: 2}, layers: [0, 7]}"))  # fmt: skip
    with pytest.raises(UserError) as e:
        plan(load_recipe(path))
    assert [str(p) for p in e.value.problems] == [
        f"{path}:3:44 lora.alpha_pattern: 'vproj' matches no adapted module; they are named like "
        "model.layers.0.self_attn.q_proj (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)",
        f"{path}:3:55 lora.layers: {tiny_model_dir('llama')} has no block 7 (its blocks: 0-1)",
    ]


def test_loraplus_leaves_the_plan_unchanged(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_model_dir("llama"))
    plain, plus = (plan(load_recipe(path, sets)) for sets in ([], ["train.loraplus_lr_ratio=16"]))
    assert plus.params == plain.params and plus.memory == plain.memory


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_counts_and_weight_bytes_equal_bitsandbytes(method, tiny_model_dir, tmp_path):
    """On the CPU backend: PEFT's counts and the bytes bitsandbytes really stores for the base, laid out as
    `finetune train` prepares it (nf4: embeddings and norms in bf16; int8: in fp32)."""
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model

    from finetune.modeling import load_model, lora_config, prepare_quantized, resolve_targets

    sets = [f"quantization.method={method}", "model.dtype=bfloat16"]
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir("qwen2")), sets)
    result = plan(recipe)
    model = prepare_quantized(recipe, load_model(recipe, "sdpa"), checkpointing=False)
    kept = model.get_input_embeddings().weight.dtype
    assert kept == (torch.float32 if method == "int8" else torch.bfloat16)
    stored = 0
    for module in model.modules():
        stored += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            stored += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                stored += state.offset.nbytes + state.state2.absmax.nbytes + state.state2.code.nbytes
        elif isinstance(module, bnb.nn.Linear8bitLt):
            stored += module.weight.SCB.nbytes
    assert term(result, "base weights") == stored
    peft_model = get_peft_model(model, lora_config(recipe, resolve_targets(recipe, model)))
    assert (result.params.trainable, result.params.total) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_totals_on_the_meta_device(name):
    total, trainable = PUBLISHED[name]
    result = planned(name, "mistral-7b-lora.yaml", SEVEN, "lora.rank=16").params
    assert (result.base, result.trainable, result.total) == (total, trainable, total + trainable)
    assert [m.modules for m in result.by_module] == [result.by_module[0].modules] * 7


def test_presets_dora_and_modules_to_save_on_an_8b_config():
    result = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml").params
    preset = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "lora.targets=all-linear").params
    assert sorted(preset.targets) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert preset.trainable == result.trainable == PUBLISHED["llama-3.1-8b"][1]
    dora = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "lora.variant=dora").params
    # one magnitude per output feature of every adapted layer: q, o, down 4096; k, v 1024; gate, up 14336
    assert dora.trainable - result.trainable == 32 * (4096 * 3 + 1024 * 2 + 14336 * 2)
    attention = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "lora.targets=attention").params
    assert sorted(attention.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    saved = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "lora.modules_to_save=[lm_head]").params
    assert saved.trainable - result.trainable == 128256 * 4096


# --- memory arithmetic ---------------------------------------------------------------------------


def test_quantized_bytes_per_parameter():
    recipe = fixture_recipe("llama-3.1-8b", "llama-3.1-8b-qlora.yaml")
    n, rows = 14336 * 4096, 14336
    double = _quantized_bytes(n, rows, recipe) / n
    assert 0.5158 < double < 0.5160  # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks: ~4.127 bits
    single = load_recipe(ROOT / "recipes/llama-3.1-8b-qlora.yaml", ["quantization.double_quant=false"])
    assert 0.5625 <= _quantized_bytes(n, rows, single) / n < 0.5626  # 4 bits + fp32 absmax per 64: 4.5 bits
    int8 = load_recipe(ROOT / "recipes/mistral-7b-lora.yaml", ["quantization.method=int8"])
    assert _quantized_bytes(n, rows, int8) == n + 4 * rows  # int8 + one fp32 scale per row


def test_bf16_lora_memory_terms():
    """Plain LoRA on a bf16 base: weights 2 B/param, fp32 adapter, AdamW 8 B per trainable param."""
    result = planned("mistral-7b-v0.3", "mistral-7b-lora.yaml")
    trainable = result.params.trainable
    assert term(result, "base weights") == 2 * result.params.base
    assert term(result, "adapter weights") == term(result, "gradients") == 4 * trainable
    assert term(result, "optimizer state") == 8 * trainable
    assert result.memory.total == sum(t.bytes for t in result.memory.terms)


def test_qlora_memory_terms():
    """NF4: adapter in bf16 (TRL's cast), 8-bit paged AdamW ~2.03 B/param, embeddings and head in bf16."""
    result = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml")
    trainable = result.params.trainable
    assert term(result, "adapter weights") == 2 * trainable
    assert 2.0 * trainable < term(result, "optimizer state") < 2.04 * trainable
    not_quantized = 2 * 128256 * 4096 + 65 * 4096  # embeddings, head, norms, in bf16
    quantized = result.params.base - not_quantized
    assert term(result, "base weights") == pytest.approx(2 * not_quantized + 0.5159 * quantized, rel=1e-3)
    dora = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "lora.variant=dora")
    magnitudes = dora.params.trainable - trainable
    assert term(dora, "adapter weights") == 2 * trainable + 4 * magnitudes  # DoRA magnitudes stay fp32


def test_checkpointing_lowers_activations_and_they_scale_with_the_batch():
    on = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml")
    off = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "train.gradient_checkpointing=false")
    memory = on.memory
    assert memory.activations_with_checkpointing < memory.activations_without_checkpointing / 3
    assert term(on, "activations") == memory.activations_with_checkpointing
    assert term(off, "activations") == memory.activations_without_checkpointing
    assert off.memory.total > on.memory.total
    double = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "train.batch_size=8")
    # per-token terms double; the fused loss's logit tile (at most 4096 tokens) does not
    assert 1.9 < double.memory.activations_with_checkpointing / memory.activations_with_checkpointing < 2
    fits = {fit.memory_gb: fit for fit in memory.fits}
    assert list(fits) == [24, 40, 48, 80, 141]
    assert {gb: fit.fits for gb, fit in fits.items()} == {gb: memory.total <= gb * GB for gb in fits}
    assert all(fit.headroom == gb * GB - memory.total and not fit.checkpointing for gb, fit in fits.items())
    assert fits[141].fits and not off.memory.fits[0].fits


def test_auto_checkpointing_turns_on_in_the_fit_exactly_where_train_would_turn_it_on():
    from finetune.speed import GPU_MEMORY_SHARE

    auto = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "train.gradient_checkpointing=auto").memory
    with_ckpt = auto.lower_bound + auto.activations_with_checkpointing
    for fit in auto.fits:
        assert fit.checkpointing == (auto.total > GPU_MEMORY_SHARE * fit.memory_gb * GB)
        assert fit.need == (with_ckpt if fit.checkpointing else auto.total)
        assert fit.fits == (fit.need <= fit.memory_gb * GB) and fit.headroom == fit.memory_gb * GB - fit.need
    assert any(fit.checkpointing for fit in auto.fits) and not auto.fits[-1].checkpointing


def test_unknown_sequence_length_leaves_activations_unknown():
    result = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml", "data.max_seq_length=auto")
    assert result.memory.total is None and term(result, "activations") is None
    assert result.memory.fits[0].fits is None  # the rest fits in 24 GB; with activations, unknown
    assert any("max_seq_length is auto" in n for n in result.notes)


# --- work and time -------------------------------------------------------------------------------


def test_work_from_local_data(tiny_model_dir, tmp_path):
    from finetune.data import prepare_data
    from finetune.modeling import load_tokenizer

    path = write_recipe(tmp_path, tiny_model_dir("llama"), rows=40)
    recipe = load_recipe(path)
    work = plan(recipe).work
    stats = prepare_data(recipe, load_tokenizer(recipe)).stats
    assert work.available and (work.train_rows, work.eval_rows) == (30, 10)
    assert work.tokens_per_epoch == stats.train_tokens and work.trained_tokens_per_epoch == stats.trained_tokens
    assert work.steps_per_epoch == math.ceil(math.ceil(30 / 4) / 2) == 4
    assert work.total_steps == 8 and work.total_tokens == 2 * stats.train_tokens
    packed = plan(load_recipe(path, ["data.packing=true"]))
    assert packed.work.sequences_per_epoch < 30
    assert packed.work.sequences_per_epoch >= math.ceil(stats.train_tokens / 64)
    capped = plan(load_recipe(path, ["train.max_steps=3"])).work
    assert capped.total_steps == 3 and capped.epochs == pytest.approx(3 / 4)


def test_grpo_counts_a_reference_only_with_beta_and_one_sequence_length(tmp_path, parent):  # noqa: F811
    from shared_grpo import grpo_recipe

    path = grpo_recipe(tmp_path, parent)
    with_kl = plan(load_recipe(path), gpu="H100")
    without = plan(load_recipe(path, ["train.grpo.beta=0.0"]), gpu="H100")
    assert term(with_kl, "reference adapter") == term(with_kl, "adapter weights") > 0
    assert "reference adapter" not in {t.name for t in without.memory.terms}  # beta 0: TRL loads no frozen copy
    assert without.time.flops_per_token < with_kl.time.flops_per_token  # and runs no reference forward pass
    longest = with_kl.work.max_seq_length  # the longest prompt + max_completion_length, under data.max_seq_length
    assert longest < 64 and with_kl.memory.seq_length == longest  # the memory header and the work section agree
    assert f"x {longest} tokens" in next(t.detail for t in with_kl.memory.terms if t.name == "activations")


def test_hub_data_is_reported_not_fetched():
    work = planned("llama-3.1-8b", "llama-3.1-8b-qlora.yaml").work
    assert not work.available and "data not available locally" in work.note
    assert "HuggingFaceH4/ultrachat_200k" in work.note


def test_time_from_gpu_or_tflops():
    recipe = fixture_recipe("llama-3.1-8b", "llama-3.1-8b-qlora.yaml")
    result = plan(recipe, gpu="h100")
    t = result.time
    assert t.gpu == "H100" and t.peak_tflops == GPU_TFLOPS["H100"] == 989
    # frozen base: forward 2N + backward 2N, + 2N to recompute with checkpointing; N without the input table;
    # TRL's fused loss recomputes the head's logits in the backward pass: + 2Vh
    head = 128256 * 4096
    assert t.matmul_params == result.params.base - head
    assert t.flops_per_token == 6 * t.matmul_params + 2 * head
    assert t.seconds_per_step == pytest.approx(4 * 4 * 2048 * t.flops_per_token / (989e12 * 0.4))
    assert plan(recipe, tflops=100, mfu=0.5).time.seconds_per_step == pytest.approx(t.seconds_per_step * 989 * 0.4 / 50)
    assert plan(recipe).time is None
    with pytest.raises(UserError, match="unknown GPU 'B200'"):
        plan(recipe, gpu="B200")
    with pytest.raises(UserError, match="--mfu"):
        plan(recipe, gpu="A100", mfu=1.5)


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_json_on_a_model_dir_without_weights(tiny_model_dir, tmp_path):
    """config.json and tokenizer files only: plan must not need a weight file."""
    source = tiny_model_dir("mistral")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for f in source.iterdir():
        if f.suffix not in (".safetensors", ".bin", ".pt") and f.is_file():
            shutil.copy(f, config_only / f.name)
    assert not list(config_only.glob("*.safetensors"))
    recipe = write_recipe(tmp_path, config_only, rows=16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "plan", str(recipe), "--json", "--gpu", "A10G", "--set", "lora.rank=4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    h, i, L, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, 64  # 1 kv head x 64
    q = config.num_attention_heads * config.head_dim
    per_layer = 4 * ((h + q) + (h + kv) * 2 + (q + h)) + 4 * ((h + i) * 2 + (i + h))
    assert out["params"]["trainable"] == L * per_layer
    assert out["work"]["available"] and out["work"]["train_rows"] == 12
    assert out["time"]["gpu"] == "A10G" and out["memory"]["total"] > 0


def test_cli_human_output(tmp_path):
    result = CliRunner().invoke(
        app, ["plan", str(ROOT / "recipes/qwen2.5-7b-qlora.yaml"), "--set", f"model.base={CONFIGS / 'qwen2.5-7b'}"]
    )
    assert result.exit_code == 0, result.output
    for text in ("trainable parameters", "161,480,704", "base weights", "optimizer state", "activations", "fits"):
        assert text in result.output
    assert "data not available locally" in result.output


def test_cli_hub_model_offline_says_how_to_plan(monkeypatch):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (conftest sets it)")
    result = CliRunner().invoke(app, ["plan", str(ROOT / "recipes/llama-3.1-8b-qlora.yaml")])
    assert result.exit_code == 2
    assert "meta-llama/Llama-3.1-8B-Instruct" in result.output and "--set model.base=" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("config", "sharded"),
    [
        ("fsdp.yaml", {"base weights", "adapter weights", "gradients", "optimizer state"}),
        ("deepspeed-zero2.yaml", {"gradients", "optimizer state"}),
        ("deepspeed-zero3.yaml", {"base weights", "adapter weights", "gradients", "optimizer state"}),
        ("ddp.yaml", set()),
    ],
)
def test_per_gpu_memory_divides_what_the_strategy_shards(config, sharded):
    from finetune.plan import plan
    from finetune.recipe.load import load_recipe

    root = Path(__file__).resolve().parent.parent
    base = ["model.base=" + str(root / "tests/support/fixtures/configs/llama-3.1-8b")]
    single = plan(load_recipe(root / "recipes/llama-3.1-8b-qlora.yaml", base))
    shared = plan(load_recipe(root / "recipes/llama-3.1-8b-qlora.yaml",
                              [*base, f"train.distributed={root / 'configs/accelerate' / config}"]))  # fmt: skip
    for one, many in zip(single.memory.terms, shared.memory.terms, strict=True):
        expected = -(-one.bytes // 8) if one.name in sharded else one.bytes
        assert many.bytes == expected, (config, one.name)


def test_every_optimizer_the_schema_allows_has_a_memory_rule():
    import typing

    import torch

    from finetune.plan import _optimizer_bytes
    from finetune.recipe.schema import TrainSection

    optimizers = typing.get_args(TrainSection.model_fields["optimizer"].annotation)
    assert "adamw_torch_fused" in optimizers
    for name in optimizers:  # a new optimizer in the schema fails here until plan counts its state
        assert _optimizer_bytes(torch.Size([4096, 16]), torch.float32, name) >= 0, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_only_directory_plans_params_and_memory_and_skips_the_tokenizer(name, tmp_path):
    """A directory with only config.json (planning before a download): counts and memory, work skipped with a note."""
    recipe = load_recipe(write_recipe(tmp_path, CONFIGS / name), [SEVEN, "lora.rank=16", "lora.alpha=32"])
    result = plan(recipe)
    assert (result.params.base, result.params.trainable) == PUBLISHED[name]
    assert result.memory.total > 2 * result.params.base  # bf16 weights, at least
    assert not result.work.available and "no tokenizer files (config only)" in result.work.note


def test_hub_id_offline_with_only_its_config_cached(tmp_path, monkeypatch):
    """A hub id whose config.json is in the cache but nothing else, no network: planned like a config-only dir."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (conftest sets it)")
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(CONFIGS / "qwen2.5-7b" / "config.json", snapshot / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = plan(load_recipe(write_recipe(tmp_path, "Qwen/Qwen2.5-7B"), [SEVEN, "lora.rank=16"]))
    assert (result.params.base, result.params.trainable) == PUBLISHED["qwen2.5-7b"]
    assert not result.work.available and "work skipped" in result.work.note
