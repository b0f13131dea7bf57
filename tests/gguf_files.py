"""Tiny GGUF files written inside the tests with gguf's own writer, as llama.cpp's converter writes them.

The oracle is independent of the code under test and of transformers' reader: tensor names come from
gguf's name map (``gguf.get_tensor_name_map``), hyper-parameters from the writer's own methods, and
Llama's q/k rows are permuted as llama.cpp's ``convert_hf_to_gguf.py`` permutes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
          "user assistant system: who are you? I am Kit."]


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer with real merges (trained here on three sentences), ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.data.tokenize import CHATML_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(arch: str, vocab: int, seed: int = 0):
    """A 2-layer causal LM of transformers family ``arch`` (llama: tied head, like SmolLM2; qwen2: untied, biased q/k/v)."""
    import transformers as T

    torch.manual_seed(seed)
    classes = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    config = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rms_norm_eps=1e-6, tie_word_embeddings=arch == "llama")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model = model_cls(config).eval()
    with torch.no_grad():  # biases and norm gains away from their init values, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    return model


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF's rotary half-split rows -> GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, arch: str, quant: str = "f32") -> Path:
    """Write ``model`` and ``tokenizer`` as a GGUF file.

    Args:
        quant: "f32", or "q8_0" (2-D weights in GGML's Q8_0 blocks, as a quantized download would be).
    """
    import gguf
    from gguf import quants

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0)

    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is not stored: GGUF readers tie it when output.weight is absent
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name, f"gguf has no name for {hf_name}"
        array = tensor.detach().float().numpy()
        if arch == "llama" and gguf_name.endswith("attn_q"):
            array = _permute(array, c.num_attention_heads, c.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith("attn_k"):
            array = _permute(array, c.num_attention_heads, c.num_key_value_heads)
        array = np.ascontiguousarray(array)
        if quant == "q8_0" and array.ndim == 2:
            writer.add_tensor(f"{gguf_name}.{suffix}", quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q8_0_roundtrip(model) -> None:
    """Give ``model``'s 2-D weights the values a Q8_0 file stores for them (quantized, then
    dequantized by gguf's own reference code), in place: the oracle for a Q8_0 file's import."""
    import gguf
    from gguf import quants

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                array = p.detach().float().numpy()
                p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(array, q8), q8).reshape(array.shape)))


def write_gguf_of_architecture(path: Path, architecture: str) -> Path:
    """A well-formed GGUF file of an ``architecture`` with one small tensor (for refusal tests)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
