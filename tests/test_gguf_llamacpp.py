"""The real llama.cpp (llama-cpp-python) runs lorakit's GGUF exports: an adapter applied by llama.cpp to
the base GGUF, and a merged GGUF, give lorakit's own logits (within 1e-3) and greedy tokens.

The bases are tiny models written as GGUF in the test (tests/gguf_files.py: Llama with a tied head,
Qwen2 untied with q/k/v biases; a Qwen3 directory for the merge written from Hugging Face). lorakit's
side runs the same base dequantized from that file, with the adapter loaded. llama.cpp keeps its KV
cache in f32 so the comparison is of the model, not of cache rounding.

Marked ``llamacpp``: excluded from the default run, run by CI's own stage (`pytest -m llamacpp`), which
installs llama-cpp-python (a source build).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from lorakit import LoraConfig, inject_lora, save_adapter  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.models.gguf_adapter import export_adapter_gguf  # noqa: E402
from lorakit.models.gguf_layout import BaseLayout  # noqa: E402
from lorakit.models.gguf_merged import export_merged_gguf  # noqa: E402
from .gguf_files import tiny_bpe_tokenizer, tiny_model, write_gguf  # noqa: E402

pytestmark = pytest.mark.llamacpp

GGML_TYPE_F32 = 0
PROMPT = [5, 17, 42, 99, 3, 250, 64, 7, 128, 31, 77, 12]
NEW_TOKENS = 8


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _train_like_adapter(model, directory: Path, targets, seed: int, **extra) -> Path:
    """A lorakit adapter with random A and B (as after training), saved in PEFT's layout."""
    torch.manual_seed(seed)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, init_lora_weights=False, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    save_adapter(model, directory)
    return directory


def _llama(model_path: Path, lora_path: Path = None) -> "llama_cpp.Llama":
    extra = {"lora_path": str(lora_path), "lora_scale": 1.0} if lora_path else {}
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, seed=0, **extra)


def _llama_run(llm) -> tuple[np.ndarray, list]:
    """Logits for PROMPT (len, vocab) and NEW_TOKENS greedy tokens after it."""
    llm.reset()
    llm.eval(PROMPT)
    logits = np.array(llm.scores[: len(PROMPT)], dtype=np.float64)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return logits, tokens


def _lorakit_run(model) -> tuple[np.ndarray, list]:
    model.eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].double().numpy()
        tokens = []
        for _ in range(NEW_TOKENS):
            token = int(model(ids).logits[0, -1].argmax())
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return logits, tokens


def _compare(llama_out, lorakit_out, base_logits=None):
    (logits, tokens), (want_logits, want_tokens) = llama_out, lorakit_out
    gap = np.abs(logits - want_logits).max()
    assert gap < 1e-3, f"llama.cpp's logits differ from lorakit's by {gap:.3g}"
    assert tokens == want_tokens
    if base_logits is not None:  # the adapter matters: without it the logits are far from these
        assert np.abs(base_logits - want_logits).max() > 0.1


CASES = {
    # Llama: the q/k rows of the base file are permuted, so must be the adapter's; rsLoRA and a
    # per-module alpha are folded into B.
    "llama": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                  extra=dict(use_rslora=True, alpha_pattern={"o_proj": 3.0}, rank_pattern={"k_proj": 2})),
    # Qwen2: no permutation, biased q/k/v, an untied head, and a LoRA on the token embedding.
    "qwen2": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"], extra={}),
}


def _setup(tmp_path, arch):
    tokenizer = tiny_bpe_tokenizer()
    base_file = write_gguf(tiny_model(arch, vocab=len(tokenizer)), tokenizer, tmp_path / f"{arch}.gguf", arch)
    case = CASES[arch]
    model = load_model(str(base_file))  # the same base as lorakit trains on: dequantized from the file
    base_logits, _ = _lorakit_run(model)
    adapter = _train_like_adapter(model, tmp_path / "adapter", case["targets"], seed=3, **case["extra"])
    return base_file, adapter, model, base_logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_applies_the_exported_adapter_as_lorakit_does(tmp_path, cache, arch):
    base_file, adapter, model, base_logits = _setup(tmp_path, arch)
    out, _ = export_adapter_gguf(adapter, tmp_path / "adapter.gguf", base=str(base_file))
    _compare(_llama_run(_llama(base_file, out)), _lorakit_run(model), base_logits)


def test_without_the_q_k_permutation_the_llama_adapter_is_wrong(tmp_path, cache, monkeypatch):
    """The check has teeth: the same export with the Llama q/k permutation switched off gives logits
    llama.cpp computes far from lorakit's (it errors nowhere)."""
    base_file, adapter, model, _ = _setup(tmp_path, "llama")
    monkeypatch.setattr(BaseLayout, "permute_rows", lambda self, name, rows: rows)
    out, _ = export_adapter_gguf(adapter, tmp_path / "unpermuted.gguf", base=str(base_file))
    logits, _ = _llama_run(_llama(base_file, out))
    want, _ = _lorakit_run(model)
    assert np.abs(logits - want).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_the_merged_gguf_as_lorakit_runs_base_plus_adapter(tmp_path, cache, arch):
    base_file, adapter, model, base_logits = _setup(tmp_path, arch)
    out, _ = export_merged_gguf(str(base_file), adapter, tmp_path / "merged.gguf")
    _compare(_llama_run(_llama(out)), _lorakit_run(model), base_logits)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_llama_cpp_runs_a_gguf_merged_from_a_directory(tmp_path, cache, arch):
    """A Hugging Face directory base: lorakit builds the hyper-parameters and the vocabulary. Qwen3 (the
    demo model's family: q/k norms, head_dim 32 != hidden / heads, a tied head) and Llama (q/k rows
    permuted by lorakit's writer itself)."""
    import transformers as T

    tokenizer = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    if arch == "qwen3":
        config = T.Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                               tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = T.Qwen3ForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape) * 0.1)
    else:
        model = tiny_model("llama", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    model = load_model(str(tmp_path / arch))
    base_logits, _ = _lorakit_run(model)
    adapter = _train_like_adapter(model, tmp_path / "adapter", ["q_proj", "k_proj", "v_proj", "down_proj"], seed=4)
    out, _ = export_merged_gguf(str(tmp_path / arch), adapter, tmp_path / "merged.gguf", outtype="f32")
    _compare(_llama_run(_llama(out)), _lorakit_run(model), base_logits)


def test_a_q8_0_merged_gguf_stays_close(tmp_path, cache):
    """q8_0 weights: llama.cpp's logits stay near lorakit's (the quantization's error, not a layout one)."""
    base_file, adapter, model, _ = _setup(tmp_path, "llama")
    out, _ = export_merged_gguf(str(base_file), adapter, tmp_path / "merged-q8.gguf", outtype="q8_0")
    logits, _ = _llama_run(_llama(out))
    want, _ = _lorakit_run(model)
    assert np.abs(logits - want).max() < 0.05 * np.abs(want).max()


def test_llama_cpp_runs_the_demo_model_merged_and_tokenizes_as_transformers(tmp_path, cache):
    """The quick start's model, merged to GGUF from its directory: llama.cpp loads its vocabulary (a
    byte tokenizer with no merges), tokenizes text and the chat prompt as transformers does, and
    computes lorakit's logits."""
    from lorakit.models import load_tokenizer

    model = load_model("demo")
    tokenizer = load_tokenizer("demo")
    base_logits, _ = _lorakit_run(model)
    adapter = _train_like_adapter(model, tmp_path / "adapter", "all-linear", seed=5)
    out, _ = export_merged_gguf("demo", adapter, tmp_path / "demo.gguf")
    llm = _llama(out)
    _compare(_llama_run(llm), _lorakit_run(model), base_logits)
    text = "Hello world, who are you? 123 <|im_end|> é"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer(chat)["input_ids"]


def test_a_head_trained_in_full_on_a_tied_base_merges_as_its_own_output_tensor(tmp_path, cache):
    """modules_to_save=["lm_head"] on a tied base (no llama.cpp adapter can hold it): the merged file
    gets an output.weight of its own next to the unchanged token embedding, and llama.cpp uses it."""
    import gguf

    tokenizer = tiny_bpe_tokenizer()
    base_file = write_gguf(tiny_model("llama", vocab=len(tokenizer)), tokenizer, tmp_path / "llama.gguf", "llama")
    model = load_model(str(base_file))
    base_logits, _ = _lorakit_run(model)
    torch.manual_seed(6)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape) * 0.05)
    save_adapter(model, tmp_path / "adapter")
    out, _ = export_merged_gguf(str(base_file), tmp_path / "adapter", tmp_path / "merged.gguf")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(out)).tensors}
    _compare(_llama_run(_llama(out)), _lorakit_run(model), base_logits)
