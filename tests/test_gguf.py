"""`model: file.gguf`: a GGUF file is dequantized once into the cache as a plain HF directory and
loaded from there; bad files get one line naming them and leave the cache untouched."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from lorakit.models import ModelError, load_model, load_tokenizer, resolve_model  # noqa: E402
from lorakit.models.cache import is_cached  # noqa: E402
from lorakit.models.gguf import gguf_model_dir  # noqa: E402
from .gguf_files import (q8_0_roundtrip, tiny_bpe_tokenizer, tiny_model, write_gguf,  # noqa: E402
                              write_gguf_of_architecture)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello <|im_start|>world, the capital 123!", "Who are you? I am Kit.\nWhat is 21 + 20?"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own, so 'nothing was written' can be checked."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(path))
    return path


def _cache_entries(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_imports_as_the_model_it_came_from(tmp_path, cache, arch):
    tokenizer = tiny_bpe_tokenizer()
    original = tiny_model(arch, vocab=len(tokenizer))
    path = write_gguf(original, tokenizer, tmp_path / f"tiny-{arch}.gguf", arch)

    directory = Path(resolve_model(str(path)))
    assert directory == gguf_model_dir(path) and directory.parent == cache / "gguf"
    assert str(path.stat().st_size) in directory.name
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config, "the converted copy would be refused for training"
    assert config["model_type"] == arch and config["tie_word_embeddings"] == (arch == "llama")

    model = load_model(str(path)).eval()  # resolves to the same cached directory
    assert type(model) is type(original)
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)
    converted = load_tokenizer(str(path))
    for text in TEXTS:
        assert converted(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert converted.chat_template == tokenizer.chat_template
    assert (converted.eos_token, converted.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_a_quantized_gguf_is_dequantized_to_what_its_blocks_hold_and_trains(tmp_path, cache):
    """A Q8_0 file imports as the model whose weights are gguf's own dequantization of its blocks,
    with no quantization left in the config: a LoRA step trains it."""
    from lorakit import LoraConfig, inject_lora

    tokenizer = tiny_bpe_tokenizer()
    original = tiny_model("llama", vocab=len(tokenizer))
    path = write_gguf(original, tokenizer, tmp_path / "tiny-q8.gguf", "llama", quant="q8_0")
    q8_0_roundtrip(original)  # the oracle: the weights the file's blocks hold

    model = load_model(str(path)).eval()
    assert "quantization_config" not in json.loads((Path(resolve_model(str(path))) / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)

    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_gguf_file_is_converted_once_and_keyed_by_its_content(tmp_path, cache):
    tokenizer = tiny_bpe_tokenizer()
    path = write_gguf(tiny_model("llama", vocab=len(tokenizer)), tokenizer, tmp_path / "a.gguf", "llama")
    first = Path(resolve_model(str(path)))
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert Path(resolve_model(str(path))) == first
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp, "converted again"

    # The same bytes elsewhere share the entry; a different file of the same size gets its own.
    copy = tmp_path / "elsewhere" / "a.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert Path(resolve_model(str(copy))) == first
    edited = tmp_path / "b" / "a.gguf"
    edited.parent.mkdir()
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last f32 of the last tensor becomes 1.0
    edited.write_bytes(bytes(data))
    assert edited.stat().st_size == path.stat().st_size
    assert Path(resolve_model(str(edited))) != first
    assert is_cached(first) and not [p for p in (cache / "gguf").iterdir() if ".tmp-" in p.name]


def _bad_files(tmp_path):
    tokenizer = tiny_bpe_tokenizer()
    good = write_gguf(tiny_model("llama", vocab=len(tokenizer)), tokenizer, tmp_path / "good.gguf", "llama").read_bytes()
    files = {}
    files["text"] = tmp_path / "text.gguf"
    files["text"].write_text("this is not a model\n")
    files["empty"] = tmp_path / "empty.gguf"
    files["empty"].write_bytes(b"")
    files["header"] = tmp_path / "header.gguf"
    files["header"].write_bytes(good[:200])
    files["half"] = tmp_path / "half.gguf"
    files["half"].write_bytes(good[: len(good) // 2])
    files["tail"] = tmp_path / "tail.gguf"
    files["tail"].write_bytes(good[:-10])
    files["arch"] = write_gguf_of_architecture(tmp_path / "rwkv.gguf", "rwkv6")
    return files


EXPECTED = {"text": "not a GGUF file", "empty": "not a GGUF file (empty)", "header": "truncated or corrupt GGUF",
            "half": "truncated", "tail": "truncated", "arch": "transformers cannot read GGUF architecture 'rwkv6'"}


def test_bad_gguf_files_are_one_line_naming_the_file_and_write_nothing(tmp_path, cache):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(ModelError) as err:
            resolve_model(str(path))
        message = str(err.value)
        assert message.startswith(f"model '{path}': ") and EXPECTED[kind] in message, (kind, message)
        assert "\n" not in message, message
    assert _cache_entries(cache) == [], "a refused file left something in the cache"


def test_the_cli_refuses_a_bad_gguf_file_with_one_line(tmp_path, cache):
    files = _bad_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_CACHE": str(cache)}
    for kind in ("text", "half"):
        proc = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", str(files[kind]), "--prompt",
                               "hi"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lorakit generate: error: model '{files[kind]}': "), proc.stderr
        assert EXPECTED[kind] in lines[0]
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelError, match=r"model '.*model.gguf': no such file"):
        resolve_model(str(missing))
    assert _cache_entries(cache) == []


def test_a_conversion_killed_midway_is_never_used(tmp_path, cache):
    """A process converting the file is killed after writing part of the model (SIGKILL, from inside
    the build, so the moment is exact): nothing appears at the cache entry; the next resolve
    converts it whole and removes what the killed one left."""
    tokenizer = tiny_bpe_tokenizer()
    original = tiny_model("llama", vocab=len(tokenizer))
    path = write_gguf(original, tokenizer, tmp_path / "k.gguf", "llama")
    code = f"""
import os, signal
from pathlib import Path
from lorakit.models.cache import ensure_cached
from lorakit.models.gguf import gguf_model_dir
def build(staging):
    (staging / "config.json").write_text('{{"model_type": "llama"}}')
    (staging / "model.safetensors").write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
ensure_cached(gguf_model_dir(Path({str(path)!r})), build)
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LORAKIT_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    target = gguf_model_dir(path)
    assert not target.exists() and [p for p in target.parent.iterdir() if ".tmp-" in p.name], "nothing was left half-built"

    model = load_model(str(path)).eval()
    assert is_cached(target) and not [p for p in target.parent.iterdir() if ".tmp-" in p.name]
    ids = torch.arange(12).reshape(2, 6)
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)


def test_missing_gguf_or_accelerate_is_one_line_saying_what_to_install(tmp_path, cache):
    path = write_gguf_of_architecture(tmp_path / "m.gguf", "llama")
    for package in ("gguf", "accelerate"):
        code = (f"import sys; sys.modules[{package!r}] = None\n"  # what Python does for a package not installed
                "from lorakit.models import ModelError, resolve_model\n"
                f"try:\n    resolve_model({str(path)!r})\nexcept ModelError as err:\n    print(err)\n")
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LORAKIT_CACHE": str(cache)},
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == (f"model '{path}': reading a GGUF file needs {package}, not installed: "
                                       "pip install 'lorakit[gguf]'"), proc.stdout + proc.stderr
    assert _cache_entries(cache) == []


def test_train_runs_on_a_gguf_base_from_the_command_line(tmp_path, cache):
    tokenizer = tiny_bpe_tokenizer()
    path = write_gguf(tiny_model("llama", vocab=len(tokenizer)), tokenizer, tmp_path / "t.gguf", "llama")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(ROOT / "configs" / "quickstart.yaml"),
                           f"model={path}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                           "train.max_seq_len=64"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Converting {path.name} (llama, GGUF)" in proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
