"""One LoRA training step on a Qwen3-MoE shape with expert targets: lorakit vs PEFT `target_parameters`.

Model: Qwen3-MoE built from a config (8 layers, 32 experts, top-4, random init); LoRA r=16 on
the fused expert weights (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) and the
attention projections. Both sides start from the same LoRA weights (lorakit's, copied into PEFT by
their shared key names; the first losses are checked equal). A step is forward + backward + AdamW;
the sides alternate step by step after warm-up, medians compared. Memory: bytes autograd saves for
backward during the step, parameters excluded (both sides, any device) and, on CUDA, the peak allocated.

    python benchmarks/moe_lora.py [--steps 5] [--warmup 1] [--batch 2] [--seq 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(args, device):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.hidden // 8, num_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)  # spread tokens over the experts
    return model.to(device).train()


def saved_bytes(fn, model) -> tuple[float, int]:
    """Run ``fn`` and count the bytes autograd keeps for backward: each storage once, and not the
    model's own parameters (keeping a reference to a weight costs no memory; a materialised
    ``W + B @ A`` does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen.setdefault(ptr, t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side (median taken)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    import peft
    from lorakit import LoraConfig, adapter_state_dict, inject_lora

    ours = build(args, device)
    inject_lora(ours, LoraConfig(r=args.r, alpha=2 * args.r, target_modules=ATTENTION, target_parameters=EXPERTS))
    with torch.no_grad():  # B = 0 would hide the experts' LoRA cost in nothing; give it values
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    theirs = peft.get_peft_model(build(args, device), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=ATTENTION, target_parameters=EXPERTS))
    state = adapter_state_dict(ours)
    missing = peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in state.items()})
    assert not [k for k in missing.unexpected_keys if "lora" in k], missing.unexpected_keys
    sides = {"lorakit": ours, "peft": theirs}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in sides.items()}
    assert trainable["lorakit"] == trainable["peft"], trainable
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in sides.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    with torch.no_grad():
        first = {k: m(input_ids=ids, labels=ids).loss.item() for k, m in sides.items()}
    assert abs(first["lorakit"] - first["peft"]) < 1e-3 * abs(first["peft"]), first

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(name: str) -> tuple[float, int, int]:
        model, opt = sides[name], opts[name]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        sync()
        start = time.perf_counter()
        loss, saved = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        took = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
        return took, saved, peak

    base = sum(p.numel() for p in ours.parameters() if not p.requires_grad)
    print(f"model: Qwen3-MoE {args.layers} layers, {args.experts} experts top-{args.top_k}, hidden {args.hidden}, "
          f"{base / 1e6:.1f}M base params; LoRA r={args.r} on experts + attention ({trainable['lorakit']:,} trainable); "
          f"batch {args.batch}x{args.seq}; {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"first loss: lorakit {first['lorakit']:.6f}  peft {first['peft']:.6f}")
    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    saved: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for i in range(args.warmup + args.steps):
        order = ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit")
        for name in order:
            took, kept, peak = step(name)
            if i >= args.warmup:
                times[name].append(took)
                saved[name] = max(saved.get(name, 0), kept)
                peaks[name] = max(peaks.get(name, 0), peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in sides:
        extra = f"  peak CUDA {peaks[name] / 2**20:8.1f} MiB" if device.type == "cuda" else ""
        print(f"{name:8s} step {med[name] * 1e3:9.1f} ms (median of {len(times[name])})  "
              f"saved for backward {saved[name] / 2**20:8.1f} MiB{extra}")
    print(f"ratio lorakit/peft: step time {med['lorakit'] / med['peft']:.2f}x, "
          f"saved-for-backward {saved['lorakit'] / saved['peft']:.2f}x"
          + (f", peak CUDA memory {peaks['lorakit'] / peaks['peft']:.2f}x" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
