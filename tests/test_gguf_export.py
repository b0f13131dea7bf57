"""`lorakit export-adapter ADAPTER OUT.gguf --format gguf`: a PEFT adapter as a llama.cpp LoRA adapter.

The oracle is independent of the code under test: the real `peft` builds and merges the adapter
(rsLoRA, rank_pattern, alpha_pattern, an embedding LoRA), the test's own GGUF writer
(tests/gguf_files.py: gguf's name map, llama.cpp's q/k permutation) writes the base and the
PEFT-merged model, and the difference of those two files must be what the exported pair adds in
llama.cpp: ``lora_b @ lora_a * alpha / r`` (r read from lora_b, as llama.cpp does). The real
llama.cpp runs the same files in tests/test_gguf_llamacpp.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from lorakit.cli import main  # noqa: E402
from lorakit.models.gguf_adapter import export_adapter_gguf  # noqa: E402
from lorakit.models.gguf_layout import GgufExportError, describe_base  # noqa: E402
from .gguf_files import tiny_bpe_tokenizer, tiny_model, write_gguf, write_gguf_of_architecture  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _peft_adapter(model, directory: Path, targets, seed: int = 1, save_embedding_layers="auto", **extra) -> Path:
    """A PEFT adapter on ``model`` (in place) with random A and B, saved to ``directory`` (PEFT's default
    saves a copy of the base embedding / head next to their LoRA; lorakit's loader does not take it)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's init_lora_weights=False gives B at the scale of A; keep deltas moderate
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    wrapped.save_pretrained(str(directory), save_embedding_layers=save_embedding_layers)
    return directory


def _merged_minus_base(base_model, adapter_dir: Path, tokenizer, tmp_path: Path, arch: str):
    """{GGUF tensor name: merged - base}, both written by the test's GGUF writer; PEFT merges."""
    import copy

    base_file = write_gguf(base_model, tokenizer, tmp_path / "oracle-base.gguf", arch)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).merge_and_unload()
    merged_file = write_gguf(merged, tokenizer, tmp_path / "oracle-merged.gguf", arch)
    _, base_tensors = _fields(base_file)
    _, merged_tensors = _fields(merged_file)
    return {name: np.asarray(merged_tensors[name].data, dtype=np.float64) - np.asarray(t.data, dtype=np.float64)
            for name, t in base_tensors.items()}


def _applied(tensors: dict, alpha: float) -> dict:
    """What llama.cpp adds to each base tensor: lora_b @ lora_a * alpha / r (token_embd: lora_a @ lora_b^T)."""
    out = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a = np.asarray(tensors[name].data, dtype=np.float64)
        b = np.asarray(tensors[base + ".lora_b"].data, dtype=np.float64)
        rank = b.shape[1]  # llama.cpp: b->ne[0]
        out[base] = (a @ b.T if base == "token_embd.weight" else b @ a) * alpha / rank
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_exported_adapter_adds_in_gguf_space_what_peft_merges(tmp_path, arch):
    """q/k/v/o + the token embedding, rsLoRA, a per-module rank and alpha: the delta llama.cpp would
    apply from the file equals PEFT's merge written as GGUF, tensor by tensor (llama: q/k permuted)."""
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model(arch, vocab=len(tokenizer))
    base_file = write_gguf(model, tokenizer, tmp_path / "base.gguf", arch)
    adapter = _peft_adapter(tiny_model(arch, vocab=len(tokenizer)), tmp_path / "adapter", ATTN + ["embed_tokens"],
                            use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0})
    out, modelfile = export_adapter_gguf(adapter, tmp_path / "kit.gguf", base=str(base_file))

    fields, tensors = _fields(out)
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == arch
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    expected = {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qkv" for ab in "ab"}
    expected |= {f"blk.{i}.attn_output.weight.lora_{ab}" for i in range(2) for ab in "ab"}
    expected |= {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    assert set(tensors) == expected
    assert tuple(tensors["blk.0.attn_k.weight.lora_a"].data.shape) == (2, 64)  # rank_pattern kept, A as is
    assert tuple(tensors["token_embd.weight.lora_a"].data.shape) == (len(tokenizer), 4)  # transposed

    oracle = _merged_minus_base(model, adapter, tokenizer, tmp_path, arch)
    applied = _applied(tensors, fields["adapter.lora.alpha"])
    for name, delta in applied.items():
        np.testing.assert_allclose(delta, oracle[name], rtol=0, atol=2e-6, err_msg=name)
        assert np.abs(delta).max() > 1e-2, name  # the adapter does something there
    untouched = [n for n in oracle if n not in applied]
    assert untouched and all(np.abs(oracle[n]).max() == 0 for n in untouched)
    assert modelfile == tmp_path / "kit.Modelfile"
    text = modelfile.read_text()
    assert f"FROM {base_file.resolve()}\n" in text and "ADAPTER ./kit.gguf\n" in text


def test_llama_q_k_rows_are_permuted_and_qwen2_rows_are_not(tmp_path):
    """The silent trap, directly: the written q lora_b is PEFT's B with llama.cpp's row permutation
    for Llama (its interleaved rotary pairs) and exactly PEFT's B for Qwen2."""
    from safetensors.torch import load_file

    from .gguf_files import _permute

    tokenizer = tiny_bpe_tokenizer()
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch, vocab=len(tokenizer))
        base_file = write_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", arch)
        adapter = _peft_adapter(tiny_model(arch, vocab=len(tokenizer)), tmp_path / f"{arch}-adapter", ["q_proj", "k_proj"])
        out, _ = export_adapter_gguf(adapter, tmp_path / f"{arch}.lora.gguf", base=str(base_file))
        _, tensors = _fields(out)
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        for proj, name, kv in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
            b = saved[f"base_model.model.model.layers.1.self_attn.{proj}.lora_B.weight"].numpy()
            want = _permute(b, 4, kv) if arch == "llama" else b
            assert not np.array_equal(_permute(b, 4, kv), b)
            np.testing.assert_array_equal(tensors[f"blk.1.{name}.weight.lora_b"].data, want)


def test_a_mistral_directory_base_is_llama_architecture_and_permuted(tmp_path):
    """Mistral checkpoints are converted by llama.cpp as `llama` (LlamaModel, undo_permute): the base
    is a Hugging Face directory here, so the name map alone decides."""
    import transformers as T
    from safetensors.torch import load_file

    from .gguf_files import _permute

    torch.manual_seed(0)
    config = T.MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.MistralForCausalLM(config)
    model.save_pretrained(tmp_path / "mistral")
    layout = describe_base(str(tmp_path / "mistral"))
    assert (layout.architecture, layout.n_head, layout.n_head_kv, layout.tied) == ("llama", 4, 2, False)
    adapter = _peft_adapter(model, tmp_path / "adapter", ["k_proj", "down_proj", "lm_head"])
    out, modelfile = export_adapter_gguf(adapter, tmp_path / "m.gguf", base=str(tmp_path / "mistral"), outtype="f16")
    fields, tensors = _fields(out)
    assert fields["general.architecture"] == "llama"
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F16}
    assert {"output.weight.lora_a", "blk.0.ffn_down.weight.lora_b"} <= set(tensors)  # untied head: an ordinary pair
    b = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight.lora_b"].data, _permute(b.half().numpy(), 4, 2))
    assert f"FROM {(tmp_path / 'mistral').resolve()}\n" in modelfile.read_text()


def test_a_gemma_directory_base_gets_gemma_names_without_permutation(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    config = T.Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = T.Gemma2ForCausalLM(config)
    model.save_pretrained(tmp_path / "gemma2")
    adapter = _peft_adapter(model, tmp_path / "adapter", ["q_proj", "gate_proj"])
    out, _ = export_adapter_gguf(adapter, tmp_path / "g.gguf", base=str(tmp_path / "gemma2"))
    fields, tensors = _fields(out)
    assert fields["general.architecture"] == "gemma2"
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in ("attn_q", "ffn_gate") for ab in "ab"}
    from safetensors.torch import load_file

    b = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"].data, b.numpy())


# --- refusals -----------------------------------------------------------------------------------------------
@pytest.fixture
def llama_base(tmp_path):
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    return model, write_gguf(model, tokenizer, tmp_path / "base.gguf", "llama"), len(tokenizer)


def _refused(tmp_path, adapter, base, match):
    out = tmp_path / "refused" / "x.gguf"
    with pytest.raises((GgufExportError, FileExistsError)) as err:
        export_adapter_gguf(adapter, out, base=str(base))
    message = str(err.value)
    assert match in message and "\n" not in message, message
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "something was written"
    return message


def test_what_llama_cpp_cannot_apply_is_refused_before_writing_naming_the_module(tmp_path, llama_base):
    model, base_file, vocab = llama_base
    dora = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "dora", ["v_proj"], use_dora=True)
    message = _refused(tmp_path, dora, base_file, "module 'model.layers.0.self_attn.v_proj' is DoRA")
    assert "lorakit merge --format gguf" in message
    saved = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "saved", ["q_proj"], modules_to_save=["lm_head"])
    message = _refused(tmp_path, saved, base_file, "module 'lm_head")
    assert "modules_to_save" in message and "lorakit merge --format gguf" in message
    head = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "head", ["q_proj", "lm_head"])
    message = _refused(tmp_path, head, base_file, "module 'lm_head' (LoRA on the output head)")
    assert "ties the head to the token embedding" in message


def test_an_unknown_architecture_or_another_base_is_refused(tmp_path, llama_base):
    model, base_file, vocab = llama_base
    adapter = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "a", ["q_proj"])
    rwkv = write_gguf_of_architecture(tmp_path / "rwkv.gguf", "rwkv6")
    _refused(tmp_path, adapter, rwkv, "architecture 'rwkv6' has no llama.cpp name map in lorakit")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 4, "n_layer": 2}))
    _refused(tmp_path, adapter, gpt2, "model_type 'gpt2' has no llama.cpp name map")
    other = write_gguf(tiny_model("qwen2", vocab=vocab), tiny_bpe_tokenizer(), tmp_path / "qwen2.gguf", "qwen2")
    wide = tmp_path / "wide"
    import transformers as T

    config = T.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    _peft_adapter(T.LlamaForCausalLM(config), wide, ["q_proj"])
    _refused(tmp_path, wide, base_file, "adapts a (32, 32) weight, but 'blk.0.attn_q.weight' of base")
    assert other.is_file()


def test_an_existing_output_is_refused_and_left_alone(tmp_path, llama_base):
    _, base_file, vocab = llama_base
    adapter = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "a", ["q_proj"])
    out = tmp_path / "kit.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="kit.gguf: already exists"):
        export_adapter_gguf(adapter, out, base=str(base_file))
    assert out.read_bytes() == b"precious" and not (tmp_path / "kit.Modelfile").exists()
    out.unlink()
    (tmp_path / "kit.Modelfile").write_text("mine")
    with pytest.raises(FileExistsError, match="kit.Modelfile: already exists"):
        export_adapter_gguf(adapter, out, base=str(base_file))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_the_cli_exports_with_the_base_from_the_adapter_config_and_refuses_in_one_line(tmp_path, llama_base, capsys):
    _, base_file, vocab = llama_base
    adapter = _peft_adapter(tiny_model("llama", vocab=vocab), tmp_path / "a", ["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_file)  # as lorakit train writes `model:` there
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export-adapter", str(adapter), str(tmp_path / "kit.gguf"), "--format", "gguf"]) == 0
    assert "a llama.cpp LoRA adapter (4 tensor pairs, f32, architecture llama" in capsys.readouterr().out
    assert main(["export-adapter", str(adapter), str(tmp_path / "kit.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit export-adapter: error: ") and "already exists" in err[0]
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export-adapter", str(adapter), str(tmp_path / "k2.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no base model" in err[0] and "--base" in err[0]
    assert main(["export-adapter", str(adapter), str(tmp_path / "k3"), "--base", str(base_file)]) == 2
    assert "--base and --outtype are for --format gguf" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "k2.gguf")


# --- merged models ------------------------------------------------------------------------------------------
def _merged_oracle(model, adapter: Path, tokenizer, path: Path, arch: str):
    """PEFT's merge of ``adapter`` into a copy of ``model``, written by the test's GGUF writer."""
    import copy

    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload()
    return write_gguf(merged, tokenizer, path, arch)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_merged_gguf_over_a_gguf_base_is_peft_merge_with_the_base_metadata(tmp_path, variant):
    """Base: a tiny Llama GGUF (tied head). The merged file has every metadata key of the base
    (tokenizer, chat template, hyper-parameters) and the tensors of PEFT's merge written as GGUF; DoRA
    (which no llama.cpp adapter holds) merges too."""
    from lorakit.models.gguf_merged import export_merged_gguf

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    base_file = write_gguf(model, tokenizer, tmp_path / "base.gguf", "llama")
    targets = ["q_proj", "k_proj", "down_proj"] + (["gate_proj"] if variant == "lora" else [])
    adapter = _peft_adapter(tiny_model("llama", vocab=len(tokenizer)), tmp_path / "adapter", targets,
                            use_dora=variant == "dora")
    out, modelfile = export_merged_gguf(str(base_file), adapter, tmp_path / "merged.gguf")
    assert modelfile.read_text().splitlines()[-1] == "FROM ./merged.gguf"

    fields, tensors = _fields(out)
    base_fields, base_tensors = _fields(base_file)
    for key, value in base_fields.items():
        if not key.startswith("GGUF."):
            assert fields[key] == value, key
    assert "tokenizer.chat_template" in fields and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    _, oracle = _fields(_merged_oracle(model, adapter, tokenizer, tmp_path / "oracle.gguf", "llama"))
    assert list(tensors) == list(base_tensors) == list(oracle)
    changed = 0
    for name, tensor in tensors.items():
        np.testing.assert_allclose(tensor.data, oracle[name].data, rtol=0, atol=1e-5, err_msg=name)
        changed += not np.array_equal(tensor.data, base_tensors[name].data)
    assert changed == len(targets) * 2  # two layers each


def test_a_merged_gguf_from_a_directory_base_builds_the_vocabulary_and_quantizes_q8_0(tmp_path):
    """Base: a tiny Qwen2 Hugging Face directory. Hyper-parameters, the byte-level BPE vocabulary
    (tokens, merges, special ids, chat template) and the merged tensors match what the test's writer
    makes of PEFT's merge; with q8_0 each 2-D weight holds exactly gguf's Q8_0 blocks of it."""
    from gguf import quants

    from lorakit.models.gguf_merged import export_merged_gguf

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_model("qwen2", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    adapter = _peft_adapter(tiny_model("qwen2", vocab=len(tokenizer)), tmp_path / "adapter", ATTN + ["lm_head"],
                            save_embedding_layers=False)
    oracle_file = _merged_oracle(model, adapter, tokenizer, tmp_path / "oracle.gguf", "qwen2")
    oracle_fields, oracle = _fields(oracle_file)
    for outtype in ("f32", "q8_0"):
        out, _ = export_merged_gguf(str(tmp_path / "qwen2"), adapter, tmp_path / f"merged-{outtype}.gguf", outtype)
        fields, tensors = _fields(out)
        for key in ("general.architecture", "qwen2.block_count", "qwen2.embedding_length", "qwen2.attention.head_count",
                    "qwen2.attention.head_count_kv", "qwen2.feed_forward_length", "qwen2.rope.freq_base",
                    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                    "tokenizer.chat_template"):
            assert fields[key] == pytest.approx(oracle_fields[key]) if isinstance(fields[key], float) else \
                fields[key] == oracle_fields[key], key
        # transformers loads a qwen2 directory's tokenizer with Qwen2's split pattern; llama.cpp names it qwen2
        assert fields["tokenizer.ggml.pre"] == "qwen2"
        assert set(tensors) == set(oracle)
        for name, tensor in tensors.items():
            want = np.asarray(oracle[name].data, dtype=np.float32)
            if outtype == "q8_0" and want.ndim == 2:
                assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
                q8 = gguf.GGMLQuantizationType.Q8_0
                got = quants.dequantize(tensor.data, q8).reshape(want.shape)
                np.testing.assert_allclose(got, quants.dequantize(quants.quantize(want, q8), q8).reshape(want.shape),
                                           rtol=0, atol=2e-3 * np.abs(want).max(), err_msg=name)
            else:
                np.testing.assert_allclose(tensor.data, want, rtol=0, atol=1e-5, err_msg=name)


def test_merge_to_gguf_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    import transformers as T

    tokenizer = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    config = T.Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = T.Gemma2ForCausalLM(config)
    model.save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    adapter = _peft_adapter(model, tmp_path / "adapter", ["q_proj"])
    out = tmp_path / "out" / "m.gguf"
    argv = ["merge", "--model", str(tmp_path / "gemma2"), "--adapter", str(adapter), "--out", str(out), "--format", "gguf"]
    capsys.readouterr()  # the setup's progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writing a gemma2 model from a Hugging Face directory is not supported" in err[0], err
    assert main(argv + ["--dtype", "bf16"]) == 2
    assert "--dtype and --quantization are for --format hf" in capsys.readouterr().err
    assert main(argv[:-2] + ["--outtype", "f16"]) == 2
    assert "--outtype is for --format gguf" in capsys.readouterr().err
    assert not out.parent.exists()


def test_a_tokenizer_without_merges_gets_a_merges_key_that_never_applies(tmp_path):
    """The demo model's byte tokenizer has no BPE merges; llama.cpp refuses a gpt2 vocabulary without
    the key ("cannot find tokenizer merges") and gguf writes no empty array: one merge of a special
    token with itself, which BPE over ordinary text can never apply."""
    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.models import load_model
    from lorakit.models.gguf_merged import export_merged_gguf

    model = load_model("demo")
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    out, _ = export_merged_gguf("demo", tmp_path / "adapter", tmp_path / "demo.gguf", outtype="f16")
    fields, _ = _fields(out)
    assert fields["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]
    assert fields["tokenizer.ggml.pre"] == "default" and fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.key_length"] == 64 and fields["qwen3.embedding_length"] == 256
