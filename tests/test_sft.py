"""The SFT recipe end to end on the demo model: training, checkpoints, exact resume after SIGKILL, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.recipes.sft import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "identity.jsonl"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _config(tmp_path, demo, **train):
    body = {"model": str(demo), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(DATA)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "max_seq_len": 128, "seed": 7, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _hf_reply(demo, messages, max_new_tokens, adapter=None):
    """The oracle for generation: transformers' own greedy ``generate`` (the adapter loaded by ``peft``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    if adapter is not None:
        model = pytest.importorskip("peft").PeftModel.from_pretrained(model, adapter).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_run_trains_saves_checkpoints_and_a_peft_adapter(tmp_path, demo):
    cfg = load_config(_config(tmp_path, demo, save_steps=3, max_steps=9), ["data.eval=" + str(DATA)])
    lines = []
    adapter = run(cfg, log=lines.append)
    out = tmp_path / "run"
    log = "\n".join(lines)
    assert "Applied LoRA to: model.layers.0.self_attn.q_proj" in log and "Trainable %" in log
    assert "37 samples" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng_state.safetensors",
                 "trainer_state.json", "config.yaml"):
        assert (out / "checkpoint-6" / name).is_file(), name
    assert not list(out.glob(".checkpoint-*")) and not list(out.rglob("*.pt*")) and not list(out.rglob("*.bin"))
    records = _metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 10))
    assert losses[-1] < losses[0]
    assert any("eval_loss" in r for r in records)
    summary = next(r for r in records if "train_runtime" in r)
    assert summary["step"] == 9 and summary["train_tokens"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "loss.png").stat().st_size > 1000
    # the final adapter is a PEFT adapter of the trained weights
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo)
    model = peft.PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.count_nonzero(saved[name]) > 0
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight, saved[name])


def test_packing_grad_accum_and_checkpointing_paths(tmp_path, demo):
    base = load_config(_config(tmp_path, demo, max_steps=2, grad_accum=2, packing=True), ["lora.dropout=0.0"])
    run(base, log=lambda _: None)
    plain = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    again = load_config(_config(tmp_path, demo, max_steps=2, grad_accum=2, packing=True, gradient_checkpointing=True),
                        ["lora.dropout=0.0", f"output_dir={tmp_path / 'run2'}"])
    run(again, log=lambda _: None)
    checkpointed = load_file(tmp_path / "run2" / "adapter" / "adapter_model.safetensors")
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, atol=1e-6, rtol=0)


def _train(args, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **popen)


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path, demo):
    steps = 30
    cfg = _config(tmp_path, demo, max_steps=steps, save_steps=4)
    reference = _train([str(cfg), f"output_dir={tmp_path / 'ref'}"])
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    victim = _train([str(cfg)])
    out = tmp_path / "run"
    deadline = time.time() + 240
    while not (out / "checkpoint-8").exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (out / "adapter").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < steps

    resumed = _train([str(cfg), "--resume"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"Resumed from {out / f'checkpoint-{killed_at}'}" in output
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == ref.keys()
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    steps_logged = [r["step"] for r in _metrics(out) if "loss" in r and "train_runtime" not in r]
    assert steps_logged == list(range(1, steps + 1))


def test_cli_errors_are_one_line(tmp_path, demo):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"conversations": [}\n')
    cfg = _config(tmp_path, demo)
    proc = _train([str(cfg), f"data.train={bad}"])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2
    assert f"error: {bad}:2: invalid JSON" in out and "Traceback" not in out
    proc = _train([str(cfg), "train.lrr=1"])
    out = proc.communicate(timeout=120)[0]
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in out and "Traceback" not in out
    proc = _train([str(cfg), f"model={tmp_path / 'nope'}"])
    out = proc.communicate(timeout=120)[0]
    assert "no such directory" in out and "Traceback" not in out


def _random_adapter(demo, path):
    """A saved adapter with random weights: the random base answers every prompt alike, this does not."""
    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.models import load_model

    from .models import randomize_lora

    model = load_model(str(demo))
    inject_lora(model, LoraConfig(r=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.5)
    save_adapter(model, path)
    return path


def test_generate_prints_only_the_completion(tmp_path, demo):
    adapter = _random_adapter(demo, tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", str(demo), "--adapter", str(adapter),
                           "--prompt", "Who are you?", "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = _hf_reply(demo, [{"role": "user", "content": "Who are you?"}], 12, adapter=adapter)
    assert expected != _hf_reply(demo, [{"role": "user", "content": "Who are you?"}], 12)  # the adapter shows
    assert proc.stdout == expected + "\n"
    assert "Who are you?" not in proc.stdout and "<|im_start|>" not in proc.stdout


def test_chat_is_multi_turn(tmp_path, demo):
    adapter = _random_adapter(demo, tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--model", str(demo), "--adapter", str(adapter),
                           "--max-new-tokens", "6"],
                          input="hello\nagain\n/reset\nonce more\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the second reply continues the conversation; after /reset the history is gone
    first = _hf_reply(demo, [{"role": "user", "content": "hello"}], 6, adapter)
    second = _hf_reply(demo, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "again"}], 6, adapter)
    third = _hf_reply(demo, [{"role": "user", "content": "once more"}], 6, adapter)
    assert second != _hf_reply(demo, [{"role": "user", "content": "again"}], 6, adapter)  # history counts
    turns = proc.stdout.split("you> ")[1:]
    assert turns == [f"assistant> {first}\n", f"assistant> {second}\n", "(history cleared)\n",
                     f"assistant> {third}\n", ""]


def test_demo_model_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run([sys.executable, "-m", "lorakit", "demo-model", str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7
    assert tok.decode(tok("héllo 你好")["input_ids"]) == "héllo 你好"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    again = subprocess.run([sys.executable, "-m", "lorakit", "demo-model", str(tmp_path / "m")], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="padding-free kernels (flash varlen, flex) train on CUDA only")
def test_padding_free_batches_train_like_padded_ones(tmp_path, demo):
    # flex_attention keeps concatenated samples apart with a document mask: padding-free; eager would
    # need a dense mask over the concatenation, so it pads. Same data, same adapter.
    adapters, logs = {}, {}
    for kernel in ("flex_attention", "eager"):
        cfg = load_config(_config(tmp_path, demo, max_steps=3, padding_free=True),
                          ["lora.dropout=0.0", f"output_dir={tmp_path / kernel}", f"train.attn_implementation={kernel}",
                           "train.dtype=fp32", "train.device=cuda"])
        logs[kernel] = []
        run(cfg, log=logs[kernel].append)
        adapters[kernel] = load_file(tmp_path / kernel / "adapter" / "adapter_model.safetensors")
    assert any(line.startswith("Micro-batches: padding-free (flex_attention") for line in logs["flex_attention"])
    assert any(line.startswith("Micro-batches: padded (eager") for line in logs["eager"])
    for key, value in adapters["eager"].items():
        torch.testing.assert_close(adapters["flex_attention"][key], value, atol=1e-4, rtol=1e-3)


def test_sdpa_trains_padding_free_like_padded_batches(tmp_path, demo):
    # sdpa runs padding-free as lorakit's packed sdpa (each sample alone); the oracle is the same run
    # on padded batches (train.padding_free=false: transformers' own sdpa with a padding mask).
    adapters, logs = {}, {}
    for padding_free in (True, False):
        cfg = load_config(_config(tmp_path, demo, max_steps=3, padding_free=padding_free),
                          ["lora.dropout=0.0", f"output_dir={tmp_path / str(padding_free)}", "train.attn_implementation=sdpa"])
        logs[padding_free] = []
        run(cfg, log=logs[padding_free].append)
        adapters[padding_free] = load_file(tmp_path / str(padding_free) / "adapter" / "adapter_model.safetensors")
    assert any(line.startswith("Micro-batches: padding-free (sdpa one sample at a time") for line in logs[True])
    assert not any("padding-free" in line for line in logs[False])
    tokens = {k: _metrics(tmp_path / str(k))[-1]["train_tokens"] for k in (True, False)}
    assert tokens[True] == tokens[False]  # the same real tokens either way
    for key, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], value, atol=1e-5, rtol=1e-4)


def test_generate_with_an_adapter_uses_it(tmp_path, demo):
    """Regression: `complete` once routed every row to the base, ignoring the loaded adapter."""
    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.generation import complete
    from lorakit.models import load_model, load_tokenizer

    from .models import randomize_lora

    tok = load_tokenizer(str(demo))
    model = load_model(str(demo)).eval()
    inject_lora(model, LoraConfig(r=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.5)
    save_adapter(model, tmp_path / "adapter")
    messages = [{"role": "user", "content": "Who are you?"}]
    adapted = complete(model, tok, "Who are you?", max_new_tokens=8)
    assert adapted == _hf_reply(demo, messages, 8, adapter=tmp_path / "adapter")
    assert adapted != _hf_reply(demo, messages, 8)
    assert complete(model, tok, "Who are you?", max_new_tokens=8, adapter="default") == adapted


def test_a_fresh_run_never_reuses_or_deletes_an_earlier_runs_checkpoints(tmp_path, demo):
    cfg = load_config(_config(tmp_path, demo, max_steps=2, save_steps=1))
    run(cfg, log=lambda _: None)
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run; pass --resume"):
        run(cfg, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_skips_a_metrics_line_cut_short_by_the_kill(tmp_path, demo):
    cfg = load_config(_config(tmp_path, demo, max_steps=2, save_steps=1))
    run(cfg, log=lambda _: None)
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 1.')
    cfg.train.max_steps = 3
    run(cfg, resume=True, log=lambda _: None)
    assert [r["step"] for r in _metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_bad_device_is_a_one_line_error(tmp_path, demo):
    proc = _train([str(_config(tmp_path, demo)), "train.device=foo"])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "device 'foo' is not a device" in out and "Traceback" not in out


def test_resume_under_other_settings_is_refused(tmp_path, demo):
    cfg = load_config(_config(tmp_path, demo, max_steps=2, save_steps=1))
    run(cfg, log=lambda _: None)
    changed = load_config(_config(tmp_path, demo, max_steps=4, save_steps=1, batch_size=2))
    with pytest.raises(ValueError, match=r"global batch \(train.batch_size x ranks\): 4 x 1 -> 2 x 1"):
        run(changed, resume=True, log=lambda _: None)
    reseeded = load_config(_config(tmp_path, demo, max_steps=4, save_steps=1, seed=8))
    with pytest.raises(ValueError, match=r"train.seed: 7 -> 8"):
        run(reseeded, resume=True, log=lambda _: None)


def test_a_token_id_outside_the_models_vocabulary_is_a_located_error(tmp_path, demo):
    # A tokenizer with tokens the model lacks (added tokens, no resized embeddings): one located error
    # before training, not an IndexError from inside the embedding (or, under FSDP2, silent zeros).
    from transformers import AutoTokenizer

    from lorakit.models import load_model

    base = tmp_path / "base"
    shutil.copytree(demo, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    vocab = load_model(base, dtype=torch.float32, device=torch.device("cpu")).get_input_embeddings().num_embeddings
    tokenizer.add_tokens([f"<tool_{k}>" for k in range(vocab - len(tokenizer))] + ["<tool_last>"])  # id = vocab
    assert len(tokenizer) == vocab + 1
    tokenizer.save_pretrained(base)
    data = tmp_path / "data.jsonl"
    fine = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<tool_last> hi"}]}
    data.write_text("\n".join(json.dumps(r) for r in (fine, fine, bad)) + "\n")
    cfg = load_config(_config(tmp_path, base), ["data.train=" + str(data)])
    with pytest.raises(ValueError, match=rf"{data.name}:3: token id {vocab} is outside the model's vocabulary "
                                         rf"\({vocab} embedding rows\)"):
        run(cfg, log=lambda _: None)
