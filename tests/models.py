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
