"""lorakit's embedded demo model: a tiny Qwen3 with a byte-level tokenizer, written as an HF model dir.

Random init, a few million parameters, no download: the base every quick start and test can build.
``model: demo`` (or ``--model demo``) names it; ``ensure_demo_model`` keeps one cached copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..data.tokenize import CHATML_TEMPLATE
from ..lora.atomic import atomic_directory
from .cache import cache_dir, ensure_cached, write_model_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO = "demo"
"""The model name that means lorakit's demo model (``model: demo``, ``--model demo``)."""
DEMO_MOE = "demo-moe"
"""The model name of the demo model's Mixture-of-Experts variant (a tiny Qwen3-MoE, 8 experts, top-2)."""
DEMO_VERSION = 2  # 2: config.json names its architecture (vLLM needs it)
"""Bump when the demo model or tokenizer changes: the cache directory is named after it."""


def build_demo_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_demo_model(vocab_size: int, seed: int = 0):
    """A tiny Qwen3ForCausalLM (hidden 256, 4 layers; about 3M parameters), random init."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    model = Qwen3ForCausalLM(config)
    # The head is the tied embedding behind a unit-gain RMSNorm, so logits are bounded by
    # |h| |e| = sqrt(hidden) * |e|. At the usual std 0.02 that is ~5: no token can get more than
    # ~1/3 of the probability, whatever an adapter learns. Unit-norm embeddings lift the cap.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(config.hidden_size ** -0.5 / config.initializer_range)
    return model


def build_demo_moe_model(vocab_size: int, seed: int = 0):
    """A tiny Qwen3MoeForCausalLM (hidden 128, 2 layers, 8 experts, top-2), random init.

    Its experts are fused 3-D weights, as in Qwen3-30B-A3B: the model lorakit's MoE examples train.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(config.hidden_size ** -0.5 / config.initializer_range)
        for layer in model.model.layers:  # routers start near zero: spread tokens over the experts
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def _save_demo(directory: Path, seed: int, moe: bool = False) -> None:
    """Save the demo model (``moe``: the Mixture-of-Experts variant) and its tokenizer into the
    (existing, empty) ``directory``."""
    tokenizer = build_demo_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64  # round up: tidy matrix shapes
    model = (build_demo_moe_model if moe else build_demo_model)(vocab, seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.config.architectures = [type(model).__name__]  # what save_pretrained would record
    write_model_dir(model, tokenizer, directory)


def write_demo_model(path: Union[str, Path], seed: int = 0, moe: bool = False) -> Path:
    """Write the demo model (config, safetensors weights, tokenizer, chat template) to ``path``.

    ``moe``: the Mixture-of-Experts variant (``build_demo_moe_model``) instead of the dense one.

    The directory is built aside and renamed into place, so a half-written model never appears.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists")
    with atomic_directory(path) as staging:
        _save_demo(staging, seed, moe=moe)
    return path


def demo_model_dir(moe: bool = False) -> Path:
    """Where ``model: demo`` lives. The version in the name changes whenever the demo model's
    definition does, so a cache written by an older lorakit is never mistaken for today's."""
    return cache_dir() / f"{DEMO_MOE if moe else DEMO}-model-v{DEMO_VERSION}"


def ensure_demo_model(moe: bool = False) -> Path:
    """The cached demo model's directory, written on first use (``ensure_cached``: safe when several
    processes ask at once; nobody ever reads half a model)."""
    return ensure_cached(demo_model_dir(moe), lambda staging: _save_demo(staging, seed=0, moe=moe))
