"""vLLM serving a lorakit MoE expert adapter (the demo MoE model, a tiny Qwen3-MoE).

vLLM loads Qwen3-MoE expert LoRA in its per-expert layout (``lorakit export-adapter --format
vllm``). The oracle is lorakit's own fused adapter on the transformers model: vLLM's greedy tokens
and their log-probabilities must match.

Where it runs: vLLM's LoRA path for MoE layers (``FusedMoEWithLoRA``) computes the experts with
Triton's fused-MoE kernel, and Triton has no CPU backend. vLLM 0.32.0's CPU build therefore cannot
run an MoE model with ``enable_lora=True`` at all (with or without a LoRA request), failing in
``triton_moe.py`` with ``AttributeError: module 'triton.language' has no attribute 'float32'``.
The comparison runs on a CUDA device; on CPU a second test pins that failure, so the README's
statement is checked and goes red when a vLLM release changes it.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm
PROMPTS = ["Hello there, who", "1 + 2 =", "The capital of"]


def _adapter(tmp_path):
    """A lorakit all-linear adapter (attention + every expert) on the demo MoE model, random B."""
    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.lora.vllm_format import export_per_expert
    from lorakit.models.loading import load_model, load_tokenizer, resolve_model

    model_dir = resolve_model("demo-moe")
    model = load_model(model_dir)
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tmp_path / "fused")
    export_per_expert(tmp_path / "fused", tmp_path / "vllm")
    return model_dir, model.eval(), load_tokenizer(model_dir)


def _llm(model_dir, device_dtype):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return vllm.LLM(model=model_dir, enable_lora=True, max_lora_rank=16, max_model_len=256, enforce_eager=True,
                    dtype=device_dtype, gpu_memory_utilization=0.3 if torch.cuda.is_available() else 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's MoE LoRA kernels need a CUDA device")
def test_vllm_serves_expert_lora_like_lorakit(tmp_path):
    from vllm.lora.request import LoRARequest

    model_dir, model, tokenizer = _adapter(tmp_path)
    llm = _llm(model_dir, "float32")
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
    outs = llm.generate(PROMPTS, params, lora_request=LoRARequest("moe", 1, str(tmp_path / "vllm")))
    base_outs = llm.generate(PROMPTS, params)
    for prompt, out, base in zip(PROMPTS, outs, base_outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
            full = torch.tensor([ids[0].tolist() + expected])
            logprobs = torch.log_softmax(model(full).logits[0, ids.shape[1] - 1:-1].float(), -1)
        got = list(out.outputs[0].token_ids)
        assert got == expected[: len(got)], (prompt, got, expected)
        for step, token in enumerate(got):
            ours = logprobs[step, token].item()
            theirs = out.outputs[0].logprobs[step][token].logprob
            assert abs(ours - theirs) <= 1e-3, (prompt, step, ours, theirs)
    # the adapter is not a no-op: vLLM's base generation differs somewhere
    assert any(list(o.outputs[0].token_ids) != list(b.outputs[0].token_ids) for o, b in zip(outs, base_outs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="pins the CPU build's limitation")
def test_vllm_cpu_build_cannot_run_moe_with_lora_enabled(tmp_path):
    from lorakit.models.loading import resolve_model

    llm = _llm(resolve_model("demo-moe"), "float32")
    with pytest.raises(Exception, match="triton.language' has no attribute 'float32'"):
        llm.generate(PROMPTS[:1], vllm.SamplingParams(temperature=0.0, max_tokens=2))
