"""Serving under concurrent load: `lorakit serve` vs vLLM's OpenAI server (CPU build), same model,
same adapters, same requests.

Model: lorakit's demo model (tiny Qwen3, 4 layers, hidden 256, byte-level vocabulary); adapters:
4 random LoRA adapters, r=16 on q/k/v/o/gate/up/down. Load: N concurrent clients (1, 4, 16), each
sending --per-client streamed completions back to back (at least --min-requests per level),
cycling over the 4 adapters and the base
(unique prompts of ~45 tokens, --new tokens each, greedy, end-of-sequence ignored so every request
decodes the same number of tokens). Measured per N: requests/s, generated tokens/s, p50/p99
time to first token and latency. The servers run one at a time, alternating order in each repeat
(after a warm-up); printed: each side's median and min-max over repeats, and the per-repeat ratio
lorakit/vLLM of the throughput.

    python benchmarks/serve_load.py [--clients 1 4 16] [--per-client 4] [--new 64] [--repeats 3]

vLLM runs as ``vllm serve <demo> --enable-lora --lora-modules ... --max-lora-rank 16 --max-loras 4``
(its module ``vllm.entrypoints.openai.api_server``, under --vllm-python, default
/work/venv-vllm/bin/python) with VLLM_CPU_KVCACHE_SPACE=1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, ratios, spread  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def make_adapters(root: Path) -> tuple[str, dict[str, Path]]:
    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.models import load_model
    from lorakit.models.loading import resolve_model

    demo = resolve_model("demo")
    paths = {}
    for i, name in enumerate(ADAPTERS):
        model = load_model(demo)
        inject_lora(model, LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter(model, root / name)
        paths[name] = root / name
    return demo, paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lorakit(demo: str, adapters: dict[str, Path], max_tokens: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", demo, "--port", "0", "--served-model-name", "demo", "--max-tokens-limit",
           str(max_tokens), *sum((["--adapter", f"{n}={p}"] for n, p in adapters.items()), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"lorakit serve did not start: {line}{proc.stdout.read()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, int(found.group(1))


def start_vllm(vllm_python: str, demo: str, adapters: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # `vllm serve` is this module's entry point (called directly: the CPU build lacks the package
    # metadata the `vllm` CLI reads for --version).
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", demo, "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "demo",
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters)), "--dtype", "float32",
           "--max-model-len", "512", "--disable-log-stats",
           "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited: see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vllm serve did not come up in 600 s: see {log.name}")


def one_request(port: int, model: str, prompt: str, new: int) -> tuple[float, float, int]:
    """Stream one completion; returns (time to first token, latency, completion tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    conn.close()
    return (ttft if ttft is not None else latency), latency, tokens


def run_load(port: int, clients: int, per_client: int, new: int) -> dict[str, float]:
    models = ["demo", *ADAPTERS]
    results: list[tuple[float, float, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            requests(c)
        except BaseException as err:  # reported after the join, not lost in a thread
            errors.append(err)

    def requests(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            # ~45 byte-level tokens, different from the first one on: neither server can reuse a
            # cached prefix (vLLM's prefix caching is on by default), both prefill every prompt.
            prompt = f"{clients}.{i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8))
            out = one_request(port, models[i % len(models)], prompt, new)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    ttfts = sorted(r[0] for r in results)
    lats = sorted(r[1] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"req/s": len(results) / wall, "tok/s": sum(r[2] for r in results) / wall,
            "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99), "lat_p50": pct(lats, 0.5),
            "lat_p99": pct(lats, 0.99)}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16,
                        help="at least this many requests per load level (1 client: 16 back to back)")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default="/work/venv-vllm/bin/python", help="python of the vLLM CPU build")
    parser.add_argument("--only", choices=["lorakit", "vllm"], help="run one server (no comparison)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lorakit-serve-load-"))
    demo, adapters = make_adapters(root)
    sides = [args.only] if args.only else ["lorakit", "vllm"]
    # measured[side][clients] = one dict per repeat
    measured: dict[str, dict[int, list[dict[str, float]]]] = {s: {n: [] for n in args.clients} for s in sides}
    for repeat in range(args.repeats):
        for side in (sides if repeat % 2 == 0 else sides[::-1]):
            proc, port = (start_lorakit(demo, adapters, args.new) if side == "lorakit"
                          else start_vllm(args.vllm_python, demo, adapters))
            try:
                run_load(port, 2, 2, 8)  # warm-up: every code path once
                for n in args.clients:
                    result = run_load(port, n, max(args.per_client, -(-args.min_requests // n)), args.new)
                    measured[side][n].append(result)
                    print(f"repeat {repeat} {side:8s} N={n:2d}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()),
                          flush=True)
            finally:
                stop(proc)

    print(f"\n{load()}; {args.per_client} requests per client (at least {args.min_requests} per level), "
          f"{args.new} new tokens each, "
          f"{args.repeats} repeats (median (min-max))")
    for n in args.clients:
        for side in sides:
            rows = measured[side][n]
            print(f"N={n:2d} {side:8s} req/s {spread([r['req/s'] for r in rows], '.2f')}  "
                  f"tok/s {spread([r['tok/s'] for r in rows], '.0f')}  "
                  f"TTFT p50 {statistics.median(r['ttft_p50'] for r in rows):.3f}s "
                  f"p99 {statistics.median(r['ttft_p99'] for r in rows):.3f}s  "
                  f"latency p50 {statistics.median(r['lat_p50'] for r in rows):.3f}s "
                  f"p99 {statistics.median(r['lat_p99'] for r in rows):.3f}s")
        for side in sides:
            tail = [r["ttft_p99"] / r["ttft_p50"] for r in measured[side][n]]
            print(f"N={n:2d} {side:8s} TTFT p99/p50 per repeat: {spread(tail, '.2f')}")
        if len(sides) == 2:
            tput = ratios([r["tok/s"] for r in measured["lorakit"][n]], [r["tok/s"] for r in measured["vllm"][n]])
            print(f"N={n:2d} throughput lorakit/vLLM: {spread(tput, '.2f')}")


if __name__ == "__main__":
    main()
