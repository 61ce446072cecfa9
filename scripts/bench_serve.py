"""Merge or keep the adapter as a sidecar: what each costs at inference, and what serving many adapters costs.

    python scripts/bench_serve.py                        # quickstart model and a random ~113M Llama, 3 rounds
    python scripts/bench_serve.py --models quickstart --rounds 5 --json bench_serve.json

Part 1, generation (in this process, the model on the GPU when there is one): time to first token
(prefill + one token, batch 1) and decoding tokens/s at batch 1 and 8 (a fixed number of new tokens,
eos ignored) for
  base       the base model alone,
  unmerged   base + a rank-16 all-linear LoRA adapter (PEFT, the way `finetune serve` holds adapters),
  merged     the adapter merged into the weights (`finetune merge`),
  mixed      batch 8 only: rows for 4 different adapters in one batch (PEFT's `adapter_names`), the
             alternative to `finetune serve`'s one-adapter-at-a-time lock.
The variants run alternately, `--rounds` times; the median is kept and ratios are to the base measured
in the same rounds, so the machine's speed (and its load) mostly cancels out.

Part 2, the server: `finetune serve`'s app (uvicorn in a thread, real HTTP) under 4 concurrent clients,
each request asking for `--server-tokens` tokens greedily; throughput in completion tokens/s with 1
resident adapter (every request for it) vs 4 resident adapters (requests round-robin over them).

Part 3, `--engines` (needs vLLM: FINETUNE_VLLM_PYTHON or .engines/vllm from scripts/setup_engines.sh):
the quickstart model with one rank-16 adapter served three ways, each a real HTTP server on 127.0.0.1 --
  ours           `finetune serve`'s app (the adapter as a sidecar, one request at a time),
  vllm-sidecar   vLLM's OpenAI server with the adapter as a LoRA module (what `serve --engine vllm` starts),
  vllm-merged    vLLM's OpenAI server on the merged model (`finetune merge`'s result, no LoRA);
each at 1 and 16 concurrent streaming completions (`--engine-requests` of them, `--server-tokens` tokens
each, greedy): completion tokens/s over the whole batch and the median time to first token. The three
servers run side by side and take turns, `--rounds` times, medians kept; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "assets" / "quickstart" / "model"
ADAPTERS = 4


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def random_llama(folder: Path) -> Path:
    """A randomly initialised Llama of ~113M parameters (hidden 768, 12 layers) with the quickstart tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_runs(base: Path, folder: Path, count: int) -> list[Path]:
    """Run directories as `finetune train` lays them out, each with a random (non-zero) rank-16 adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    runs = []
    for i in range(count):
        root = folder / f"adapter-{i}"
        torch.manual_seed(i + 1)
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                            task_type="CAUSAL_LM")  # fmt: skip
        get_peft_model(model, config).save_pretrained(root / "adapter")
        tokenizer.save_pretrained(root / "adapter")
        (root / "recipe.yaml").write_text(
            f"name: adapter-{i}\nmodel: {{base: {base}, dtype: float32}}\nlora: {{rank: 16, alpha: 32, dropout: 0.0, "
            f"targets: all-linear}}\ndata: {{train: [{{path: {root / 'unused.jsonl'}}}]}}\noutput_dir: {root}\n"
        )
        (root / "manifest.json").write_text(json.dumps({"status": "completed", "base_model": {"id": str(base)}}))
        runs.append(root)
    return runs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new: int, **kwargs) -> float:
    sync()
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip
    sync()
    return time.perf_counter() - start


def bench_generation(base: Path, runs: list[Path], rounds: int, new: int, prompt_tokens: int) -> dict:
    """TTFT and tokens/s per variant; medians over alternating rounds."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.modeling import device

    dev = device()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).to(dev), str(runs[0] / "adapter"),
                                      adapter_name="adapter-0")  # fmt: skip
    for i, run in enumerate(runs[1:], start=1):
        model.load_adapter(str(run / "adapter"), adapter_name=f"adapter-{i}")
    model.set_adapter("adapter-0")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).to(dev), str(runs[0] / "adapter"))
    merged = merged.merge_and_unload().eval()
    model.eval()
    torch.manual_seed(0)
    ids = {b: torch.randint(10, 3000, (b, prompt_tokens), device=dev) for b in (1, 8)}
    mixed_names = [f"adapter-{i % ADAPTERS}" for i in range(8)]

    def run(variant: str, batch: int, tokens: int) -> float:
        kwargs = {"adapter_names": mixed_names} if variant == "mixed" else {}
        if variant == "base":
            with model.disable_adapter():
                return timed_generate(model, ids[batch], tokens)
        target = merged if variant == "merged" else model
        return timed_generate(target, ids[batch], tokens, **kwargs)

    cases = [(v, b) for v in ("base", "unmerged", "merged") for b in (1, 8)] + [("mixed", 8)]
    for v, b in cases:  # warm-up
        run(v, b, 2)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for v, b in cases:
            samples.setdefault(f"{v}/b{b}/tok_s", []).append(b * new / run(v, b, new))
            if b == 1:
                samples.setdefault(f"{v}/ttft_ms", []).append(1000 * run(v, 1, 1))
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {}
    for v in ("unmerged", "merged", "mixed"):
        for b in (1, 8):
            if f"{v}/b{b}/tok_s" in med:
                ratios[f"{v}/base tok/s b{b}"] = med[f"{v}/b{b}/tok_s"] / med[f"base/b{b}/tok_s"]
        if f"{v}/ttft_ms" in med:
            ratios[f"{v}/base TTFT"] = med[f"{v}/ttft_ms"] / med["base/ttft_ms"]
    ratios["mixed b8 / unmerged b8 tok/s"] = med["mixed/b8/tok_s"] / med["unmerged/b8/tok_s"]
    return {"medians": med, "ratios": ratios}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(runs: list[Path], rounds: int, tokens: int, requests: int) -> dict:
    """Completion tokens/s of the server with 1 vs 4 resident adapters, 4 concurrent clients, alternately."""
    import httpx
    import uvicorn

    from finetune.inference.serve import Limits, create_app, load_models

    models = load_models(runs, Limits(max_tokens=tokens, max_queue=64))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(models), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(name: str) -> int:
        body = {
            "model": name,
            "prompt": "Reverse the list: width, socket, when",
            "max_tokens": tokens,
            "temperature": 0,
        }
        return httpx.post(url, json=body, timeout=600).json()["usage"]["completion_tokens"]

    def load(names: list[str]) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            produced = sum(pool.map(one, [names[i % len(names)] for i in range(requests)]))
        return produced / (time.perf_counter() - start)

    names = [f"adapter-{i}" for i in range(ADAPTERS)]
    load(names)  # warm-up
    samples: dict[str, list[float]] = {"1 adapter": [], f"{ADAPTERS} adapters": []}
    for _ in range(rounds):
        samples["1 adapter"].append(load(names[:1]))
        samples[f"{ADAPTERS} adapters"].append(load(names))
    server.should_exit = True
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"tok_s": med, "ratio": med[f"{ADAPTERS} adapters"] / med["1 adapter"]}


def stream_one(url: str, model: str, tokens: int) -> tuple[float, int]:
    """One streaming completion: (seconds to the first text chunk, completion tokens from the usage chunk)."""
    import httpx

    body = {"model": model, "prompt": "Reverse the list: width, socket, when", "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, used = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0].get("text"):
                first = time.perf_counter() - start
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), used


def concurrent_load(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict[str, float]:
    """`requests` streaming completions, `concurrency` at a time: tokens/s over the batch, median TTFT (ms)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda _: stream_one(url, model, tokens), range(max(requests, concurrency))))
    wall = time.perf_counter() - start
    return {"tok_s": sum(n for _, n in done) / wall, "ttft_ms": 1000 * statistics.median(t for t, _ in done)}


def start_vllm(python: str, base: Path, name: str, adapter: Path | None, log: Path):
    """vLLM's OpenAI server for `base` (with `adapter` as a LoRA module, if any) as `serve --engine vllm`
    would start it; returns (process, url, log) at once: `ready` waits for it."""
    import subprocess

    from finetune.inference.vllm import MODULE, Adapter, Launch, command, platform_of

    port = free_port()
    if adapter is not None:
        launch = Launch(base=str(base), base_name="base", dtype="float32", chat_template=None,
                        adapters=(Adapter(name, adapter),), max_lora_rank=16, host="127.0.0.1", port=port)  # fmt: skip
        cmd = command(launch, python, platform_of(python))
        argv, env = cmd.argv, cmd.env
    else:  # a merged model is a plain base: no LoRA flags
        argv = [python, "-m", MODULE, "--model", str(base), "--served-model-name", name, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", "float32"]  # fmt: skip
        env = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}", log


def ready(proc, url: str, log: Path) -> None:
    """Wait until a vLLM server answers /v1/models (its CPU build takes minutes to start on 2 shared cores)."""
    import httpx

    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM did not answer within 1800 s: {log.read_text()[-3000:]}")


def merged_model(base: Path, run: Path, folder: Path) -> Path:
    """The adapter folded into the base and saved as a plain model (what `finetune merge` writes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "adapter"))
    model.merge_and_unload().save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def bench_engines(base: Path, run: Path, folder: Path, rounds: int, tokens: int, requests: int) -> dict:
    """Ours vs vLLM (sidecar LoRA and merged) at 1 and 16 concurrent streaming requests, taking turns."""
    import signal

    import uvicorn

    from finetune.inference.serve import Limits, create_app, load_models
    from finetune.inference.vllm import find_python

    python = find_python()
    merged = merged_model(base, run, folder / "merged")
    load_before = os.getloadavg()
    started = time.perf_counter()
    sidecar = start_vllm(python, base, "adapter-0", run / "adapter", folder / "sidecar.log")
    plain = start_vllm(python, merged, "merged", None, folder / "merged.log")
    for vllm in (sidecar, plain):
        ready(*vllm)
    startup_s = time.perf_counter() - started
    servers = {"vllm-sidecar": (sidecar[0], sidecar[1], "adapter-0"), "vllm-merged": (plain[0], plain[1], "merged")}
    ours = load_models([run], Limits(max_tokens=tokens, max_queue=64))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ours), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    servers["ours"] = (None, f"http://127.0.0.1:{port}", "adapter-0")
    samples: dict[str, list[dict]] = {}
    try:
        for _, url, model in servers.values():  # warm-up
            concurrent_load(url, model, 2, 2, tokens)
        for _ in range(rounds):
            for engine, (_, url, model) in servers.items():
                for c in (1, 16):
                    samples.setdefault(f"{engine} c{c}", []).append(concurrent_load(url, model, c, requests, tokens))
    finally:
        server.should_exit = True
        for proc, _, _ in servers.values():
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)
    med = {k: {m: statistics.median(s[m] for s in v) for m in ("tok_s", "ttft_ms")} for k, v in samples.items()}
    return {"medians": med, "vllm_startup_s_both": startup_s, "load_before": load_before,
            "load_after": os.getloadavg()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="quickstart,random-113m", help="quickstart and/or random-113m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--server-tokens", type=int, default=16)
    parser.add_argument("--server-requests", type=int, default=16)
    parser.add_argument("--engines", action="store_true", help="part 3: ours vs vLLM (needs vLLM) instead of 1-2")
    parser.add_argument("--engine-requests", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from finetune.modeling import quiet_libraries

    quiet_libraries()
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    print(f"machine: {results['machine']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.engines:
            [run] = make_runs(QUICKSTART, Path(tmp), 1)
            print(f"quickstart: ours vs vLLM sidecar vs vLLM merged, {args.rounds} rounds ...", flush=True)
            eng = bench_engines(QUICKSTART, run, Path(tmp), args.rounds, args.server_tokens, args.engine_requests)
            results["engines"] = eng
            print(f"load average before {eng['load_before']}, after {eng['load_after']}")
            print(f"both vLLM servers up after {eng['vllm_startup_s_both']:.0f} s")
            for k, v in eng["medians"].items():
                print(f"  {k:<18} {v['tok_s']:10.1f} tok/s   TTFT {v['ttft_ms']:8.1f} ms")
        for name in [] if args.engines else args.models.split(","):
            folder = Path(tmp) / name
            base = QUICKSTART if name == "quickstart" else random_llama(folder / "base")
            runs = make_runs(base, folder, ADAPTERS)
            print(f"{name}: generation (base, unmerged, merged, mixed), {args.rounds} rounds ...", flush=True)
            gen = bench_generation(base, runs, args.rounds, args.new_tokens, args.prompt_tokens)
            print(f"{name}: server, 1 vs {ADAPTERS} resident adapters ...", flush=True)
            srv = bench_server(runs, args.rounds, args.server_tokens, args.server_requests)
            results["models"][name] = {"generation": gen, "server": srv}
            print(f"\n{name}")
            for k, v in gen["medians"].items():
                print(f"  {k:<24} {v:10.1f}")
            for k, v in gen["ratios"].items():
                print(f"  {k:<30} {v:6.2f}x")
            for k, v in srv["tok_s"].items():
                print(f"  server {k:<17} {v:10.1f} tok/s")
            print(f"  server {ADAPTERS} adapters / 1 adapter       {srv['ratio']:6.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
