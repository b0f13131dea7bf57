"""The GRPO recipe end to end on the demo model: what changes, what must not, logging, resume, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.recipes.grpo as grpo
import lorakit.training.setup
from lorakit.config import ConfigError, load_config
from lorakit.data import collate
from lorakit.data.tokenize import IGNORE, Row
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.lora import LoraConfig, inject_lora, save_adapter
from lorakit.models import load_model, load_tokenizer
from lorakit.training import token_logprobs

from ..models import randomize_lora

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "examples" / "data" / "arith_rl.jsonl"
HELD_OUT = ROOT / "examples" / "data" / "arith_eval.jsonl"
# Correctness, plus a user reward that differs between a random model's samples (a learning signal).
REWARDS = {"numeric_match": 1.0, "tests.rl.rewards_for_tests:odd_chars": 0.1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from lorakit.models import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def warm_adapter(demo, tmp_path_factory):
    """An adapter with random (non-zero) weights: a policy that differs from the base."""
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, scale=0.2, seed=5)
    path = tmp_path_factory.mktemp("adapters") / "warm"
    save_adapter(model, path)
    return path


def _config(tmp_path, demo, name="cfg.yaml", **sections):
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(PROMPTS)},
            "lora": {"r": 4, "alpha": 8},
            "grpo": {"prompts_per_step": 2, "log_kl": True, "rewards": REWARDS},
            "rollout": {"num_generations": 4, "max_new_tokens": 4},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-3, "seed": 3, "warmup_ratio": 0.0}}
    for section, values in sections.items():
        if isinstance(values, dict):
            body.setdefault(section, {}).update(values)
        else:
            body[section] = values
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_only_the_adapter_moves_and_everything_is_logged(tmp_path, demo, monkeypatch):
    loaded = []

    def keep(*args, **kwargs):  # the recipe's own model, to inspect after the run
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(lorakit.training.setup, "load_model", keep)
    cfg = load_config(_config(tmp_path, demo, data={"eval": str(HELD_OUT)}, train={"eval_steps": 1}))
    lines = []
    adapter = grpo.run(cfg, log=lines.append)
    log = "\n".join(lines)
    assert "Held-out accuracy before training" in log and "Held-out accuracy after training" in log

    pristine = load_model(demo, dtype=torch.float32, device=torch.device("cpu")).state_dict()
    model = loaded[0]
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() == pristine.keys()
    assert all(torch.equal(base[k], pristine[k]) for k in pristine), "a base weight changed"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k), "LoRA B never moved"

    records = _metrics(tmp_path / "run")
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "zero_std_frac", "kl", "clip_frac", "completion_len",
                "tokens_per_s", "reward/numeric_match", "reward/tests.rl.rewards_for_tests:odd_chars", "logprob_gap",
                "lr", "grad_norm"):
        assert key in steps[0], key
    # Step 1 samples from, and is scored by, a fresh adapter (B = 0): policy == reference.
    assert steps[0]["kl"] == 0.0
    assert steps[0]["logprob_gap"] < 1e-5  # the trainer's log-probs are the sampler's
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoint-2" / "optimizer.safetensors").is_file()


def test_zero_advantage_sequences_are_skipped_without_changing_the_update(tmp_path, demo):
    """Sequences of groups that all scored alike get no forward or backward unless a KL term reads
    them; the oracle is the same run with log_kl on, which trains every sequence."""
    rewards = {"tests.rl.rewards_for_tests:odd_chars_on_even_prompts": 1.0}
    runs = {}
    for log_kl in (False, True):
        out = tmp_path / f"kl_{log_kl}"
        cfg = load_config(_config(tmp_path, demo, name=f"kl_{log_kl}.yaml", output_dir=str(out),
                                  grpo={"prompts_per_step": 4, "log_kl": log_kl, "rewards": rewards},
                                  train={"max_steps": 3}))
        grpo.run(cfg, log=lambda _line: None)
        runs[log_kl] = ([r for r in _metrics(out) if "reward_mean" in r],
                        load_file(out / "adapter" / "adapter_model.safetensors"))
    (skipping, skipped_adapter), (full, full_adapter) = runs[False], runs[True]
    assert all(r["skipped_frac"] == 0 for r in full)
    # every zero-std group's sequences were skipped, and nothing else
    assert [r["skipped_frac"] for r in skipping] == [r["zero_std_frac"] for r in skipping]
    assert any(r["skipped_frac"] > 0 for r in skipping) and any(r["skipped_frac"] < 1 for r in skipping)
    assert [r["reward_mean"] for r in skipping] == [r["reward_mean"] for r in full]
    assert max((skipped_adapter[k] - full_adapter[k]).abs().max().item() for k in full_adapter) <= 1e-6
    assert max(v.abs().max().item() for k, v in full_adapter.items() if "lora_B" in k) > 1e-4  # it did train


def test_trainer_logprobs_equal_the_engines(demo):
    tokenizer = load_tokenizer(demo)
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model, scale=0.3, seed=1)
    prompts = [tokenizer("12+7=")["input_ids"], tokenizer("a longer prompt: 3+4=")["input_ids"]]
    done = Engine(model, tokenizer).generate(
        [Request(p, "default", SamplingParams(max_new_tokens=6, temperature=1.0, seed=s)) for s, p in enumerate(prompts)])
    rows = []
    for p, d in zip(prompts, done):
        c = d.token_ids + ([d.stop_token_id] if d.stop_token_id is not None else [])
        rows.append(Row(p + c, [IGNORE] * len(p) + c, list(range(len(p) + len(c)))))
    sampled = torch.tensor([lp for d in done for lp in d.logprobs + ([d.stop_logprob] if d.stop_token_id is not None else [])])
    for padding_free in (False, True):
        with torch.no_grad():
            got = token_logprobs(model, collate(rows, tokenizer.pad_token_id, False, padding_free))
        assert got.shape == sampled.shape
        assert (got - sampled).abs().max().item() < 1e-5


def test_starting_from_an_adapter_keeps_a_frozen_copy_as_reference(tmp_path, demo, warm_adapter):
    cfg = load_config(_config(tmp_path, demo, init_adapter=str(warm_adapter), train={"max_steps": 1}))
    lines = []
    grpo.run(cfg, log=lines.append)
    assert "reference: a frozen copy of it" in "\n".join(lines)
    step = [r for r in _metrics(tmp_path / "run") if "kl" in r][0]
    assert step["kl"] == 0.0  # the policy starts equal to its reference

    cfg = load_config(_config(tmp_path, demo, init_adapter=str(warm_adapter), output_dir=str(tmp_path / "vs_base"),
                              grpo={"reference": "base"}, train={"max_steps": 1}))
    grpo.run(cfg, log=lambda _: None)
    step = [r for r in _metrics(tmp_path / "vs_base") if "kl" in r][0]
    assert step["kl"] > 1e-4  # the warm adapter is far from the bare base


def test_resume_continues_exactly(tmp_path, demo):
    # Constant lr: a 2-step run and its resumption to 4 steps follow the uninterrupted run's schedule.
    common = {"train": {"lr_scheduler": "constant", "save_steps": 2},
              "grpo": {"num_iterations": 2, "mini_batches": 2, "clip_eps_high": 0.28}}
    straight = load_config(_config(tmp_path, demo, output_dir=str(tmp_path / "straight"), **common),
                           ["train.max_steps=4"])
    grpo.run(straight, log=lambda _: None)
    first = load_config(_config(tmp_path, demo, output_dir=str(tmp_path / "resumed"), **common), ["train.max_steps=2"])
    grpo.run(first, log=lambda _: None)
    again = load_config(_config(tmp_path, demo, output_dir=str(tmp_path / "resumed"), **common), ["train.max_steps=4"])
    lines = []
    grpo.run(again, resume=True, log=lines.append)
    assert any("Resumed from" in line and "step 2" in line for line in lines)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ra = {r["step"]: r["reward_mean"] for r in _metrics(tmp_path / "straight") if "reward_mean" in r}
    rb = {r["step"]: r["reward_mean"] for r in _metrics(tmp_path / "resumed") if "reward_mean" in r}
    assert ra == rb and sorted(ra) == [1, 2, 3, 4]

    changed = load_config(_config(tmp_path, demo, output_dir=str(tmp_path / "resumed"), **common),
                          ["train.max_steps=6", "rollout.num_generations=2"])
    with pytest.raises(ValueError, match="rollout.num_generations: 4 -> 2"):
        grpo.run(changed, resume=True, log=lambda _: None)


@pytest.mark.parametrize("override, message", [
    ("rollout.num_generations=1", "must be >= 2"),
    ("rollout.engine=server", "rollout.base_url' is required"),
    ("grpo.rewards={}", "at least one reward"),
    ("grpo.loss_aggregation=mean", "expected one of"),
    ("grpo.clip_eps_low=1.5", "must be < 1"),
    ("rollout.async=true", "'rollout.async' needs rollout.backend server or vllm"),
    ("rollout.backend=vllm rollout.async=true rollout.temperature=0.7", "'rollout.async' needs rollout.temperature: 1"),
    ("rollout.sync=merged", "'rollout.sync' merged needs rollout.backend: vllm"),
    ("rollout.check_sync=maybe", "expected one of"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "must be in \\(0, 1\\]"),
    ("rollout.vllm.tensor_paralel_size=2", "did you mean 'rollout.vllm.tensor_parallel_size'"),
])
def test_config_errors_name_the_key(tmp_path, demo, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, demo), override.split())


def test_the_async_key_round_trips_through_the_recorded_config(tmp_path, demo):
    from lorakit.config import dump_config

    cfg = load_config(_config(tmp_path, demo), ["rollout.engine=vllm", "rollout.async=true"])
    assert cfg.rollout.async_ is True
    (tmp_path / "again.yaml").write_text(dump_config(cfg))
    assert "  async: true" in dump_config(cfg) and load_config(tmp_path / "again.yaml").rollout.async_ is True


def test_the_vllm_engine_without_vllm_says_how_to_install_it(tmp_path, demo, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed (None makes the import fail)
    loaded = []
    monkeypatch.setattr(lorakit.training.setup, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ImportError, match=r"rollout.backend: vllm needs vLLM.*pip install 'lorakit\[vllm\]'.*"
                                          r"scripts/install_vllm_cpu.sh"):
        grpo.run(load_config(_config(tmp_path, demo), ["rollout.engine=vllm"]), log=lambda _: None)
    assert not loaded  # before any model loads


def test_run_errors_before_training(tmp_path, demo):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a non-empty 'prompt'"):
        grpo.run(load_config(_config(tmp_path, demo, data={"train": str(bad)})), log=lambda _: None)
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"noanswer.jsonl:1: grpo.rewards cannot score this record: .*'answer'"):
        grpo.run(load_config(_config(tmp_path, demo, data={"train": str(noanswer)})), log=lambda _: None)
    lines = []
    with pytest.raises(ValueError, match="prompts_per_step=3"):
        grpo.run(load_config(_config(tmp_path, demo, data={"train": str(noanswer)}, grpo={"prompts_per_step": 3},
                                     train={"lr": 1e-6})), log=lines.append)
    assert any("looks like a full fine-tuning learning rate" in line for line in lines)


def test_cli_runs_the_grpo_recipe_at_rank_1(tmp_path, demo):
    cfg = _config(tmp_path, demo, train={"max_steps": 2, "lr": 2e-2})
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg), "rollout.max_new_tokens=3", "lora.r=1",
                           "lora.alpha=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GRPO: 2 steps x 2 prompts x 4 completions" in proc.stdout
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 1
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert all(v.shape[0] == 1 for k, v in tensors.items() if "lora_A" in k)
    steps = [r for r in _metrics(tmp_path / "run") if "reward_mean" in r]
    assert steps[0]["zero_std_frac"] < 1.0
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)
