"""Tiny real models, built from configs inside the tests (no network, fixed seeds)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_qwen3(seed: int = 0, vocab: int = 128, tie: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config).eval()


class TinyMLP(nn.Module):
    """A plain torch model: embedding, two blocks of Linear layers, and a head."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, 2 * dim), "down": nn.Linear(2 * dim, dim)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = h + block["down"](torch.relu(block["up"](h)))
        return self.lm_head(h)


class Poisoned(nn.Module):
    """The token embedding, replaced by a module that fails like a broken kernel would: with
    ``error`` for any batch holding token id ``poison``, or for every batch once ``armed``."""

    def __init__(self, inner: nn.Embedding, poison: int, error: type = RuntimeError) -> None:
        super().__init__()
        self.inner, self.poison, self.error, self.armed = inner, poison, error, False
        self.num_embeddings = inner.num_embeddings

    def forward(self, ids):
        if self.armed or bool((ids == self.poison).any()):
            raise self.error("CUDA error: an illegal memory access was encountered" if self.error is not RuntimeError
                             else "kernel failed")
        return self.inner(ids)


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def randomize_lora(model: nn.Module, seed: int = 123, scale: float = 0.1) -> None:
    """Give every LoRA weight a non-zero value, so adapters actually change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, experts: int = 4, top_k: int = 2):
    """A 2-layer MoE causal LM of a transformers family whose experts are fused 3-D weights.

    Routers get random weights (some start at zero), so tokens spread over the experts.
    """
    import transformers as T

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    families = {
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, head_dim=8, num_experts=experts, num_experts_per_tok=top_k)),
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            num_experts=experts, num_experts_per_tok=top_k)),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(
            intermediate_size=16, num_local_experts=experts, num_experts_per_tok=top_k, head_dim=8)),
        "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, n_routed_experts=experts, num_experts_per_tok=top_k,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
        "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(
            intermediate_size=16, num_local_experts=experts, num_experts_per_tok=top_k, head_dim=8,
            layer_types=["full_attention", "sliding_attention"], sliding_window=8)),
    }
    config_cls, model_cls, extra = families[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**common, **extra}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(torch.randn(p.shape))
    return model.eval()
