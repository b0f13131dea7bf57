"""GRPO rollouts on vLLM in the training process (the vLLM CPU build in CI; skipped without vLLM).

Oracles: lorakit's own engine and a full forward of the policy in transformers (vLLM's greedy tokens
and sampled-token log-probs must equal them in fp32), transformers' ``generate`` for the eos list.
One vLLM instance (the demo model with LoRA) is built for the module and reused by every GRPO run,
which asks for the same settings; the merged-sync and two-eos engines are built last, once each.
"""

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")

import lorakit.recipes.grpo as grpo  # noqa: E402
from lorakit.data import collect_eos_ids  # noqa: E402
from lorakit.generation import SamplingParams  # noqa: E402
from lorakit.lora import LoraConfig, inject_lora  # noqa: E402
from lorakit.models import load_model, load_tokenizer, write_demo_model  # noqa: E402
from lorakit.rl import LocalRollout, PolicySampler, StaleRolloutError  # noqa: E402
from lorakit.rl import vllm_rollout  # noqa: E402
from lorakit.rl.vllm_rollout import VllmRollout, release_vllm  # noqa: E402

from ..models import randomize_lora  # noqa: E402
from .grpo_runs import grpo_config, reward_steps  # noqa: E402
from ..test_eos_list import _chat_ids, _hf_greedy, _id, write_two_eos_model  # noqa: E402

pytestmark = pytest.mark.vllm

R = 4
# What the GRPO runs below ask for (rollout.vllm.*), so they reuse the module's engine.
ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.3)
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def engine(demo):
    tokenizer = load_tokenizer(demo)
    engine = VllmRollout(demo, [tokenizer.eos_token_id], lora_rank=R, **ENGINE)
    yield engine
    engine.close()
    release_vllm()


def _policy(demo):
    policy = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(policy, LoraConfig(r=R, alpha=8, target_modules="all-linear"))
    return policy


def _prompts(tokenizer):
    return [tokenizer("12+7=")["input_ids"], tokenizer("3+4=")["input_ids"], tokenizer("40+2=")["input_ids"]]


def _forward_logprobs(policy, prompt, completion):
    """The policy's log-probs of ``completion``'s tokens after ``prompt``: one full forward, no cache."""
    with torch.no_grad():
        logits = policy(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return torch.tensor([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)])


def test_vllm_samples_the_synced_adapter_like_lorakit(demo, engine):
    tokenizer = load_tokenizer(demo)
    policy = _policy(demo)
    vllm_side = PolicySampler(engine, policy, "default")
    lorakit_side = PolicySampler(LocalRollout(policy, tokenizer, "default", shares_policy=True), policy, "default")
    prompts = _prompts(tokenizer)
    sampled = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in range(len(prompts))]
    seen = []
    for version, seed in enumerate((1, 2)):
        randomize_lora(policy, seed=seed, scale=0.3)  # an update
        vllm_side.sync(version)
        lorakit_side.sync(version)
        got = vllm_side.generate(prompts, [GREEDY] * len(prompts))
        assert got.version == version
        assert [c.token_ids for c in got] == [c.token_ids for c in lorakit_side.generate(prompts, [GREEDY] * len(prompts))]
        seen.append([c.token_ids for c in got])
        for prompt, done in zip(prompts, vllm_side.generate(prompts, sampled)):
            assert len(done.logprobs) == len(done.token_ids)
            gap = (torch.tensor(done.logprobs) - _forward_logprobs(policy, prompt, done.token_ids)).abs().max()
            assert gap < 1e-3, gap
    assert seen[0] != seen[1]  # the second sync really replaced the adapter (in place, same LoRA id)


def _config(tmp_path, demo, name, steps=3, **rollout):
    engine = {k: v if k != "dtype" else "fp32" for k, v in ENGINE.items()}
    return grpo_config(tmp_path, demo, name, {"engine": "vllm", "max_new_tokens": 6, "vllm": engine, **rollout}, steps, R)


def test_grpo_on_vllm_trains_with_the_trainers_logprobs(demo, engine, tmp_path):
    llm = engine.llm
    handed_over = set(vllm_rollout.ram_dir().glob("lorakit-rollout-*"))
    grpo.run(_config(tmp_path, demo, "run"), log=lambda _: None)
    assert vllm_rollout._shared["llm"] is llm  # the run reused the module's engine
    steps = reward_steps(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["policy_version"] for r in steps] == [0, 1, 2] and {r["staleness"] for r in steps} == {0}
    # After each update vLLM samples the new adapter: its log-probs are the trainer's, to fp32 noise.
    assert all(r["logprob_gap"] < 1e-3 for r in steps), [r["logprob_gap"] for r in steps]
    assert len({r["loss"] for r in steps}) > 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert set(vllm_rollout.ram_dir().glob("lorakit-rollout-*")) == handed_over  # the run's hand-over dir is gone


def test_a_reload_that_skips_load_inplace_trips_the_sync_check(demo, engine, tmp_path, monkeypatch):
    # The classic stale adapter: the adapter files are rewritten, but vLLM is asked for a LoRA id it
    # already holds without load_inplace, so it keeps sampling the previous weights.
    real = VllmRollout._load_adapter

    def without_inplace(self, path):
        if self.request is None:
            return real(self, path)
        self.llm.llm_engine.add_lora(vllm_rollout.import_vllm().lora.request.LoRARequest("policy", 1, str(path)))

    monkeypatch.setattr(VllmRollout, "_load_adapter", without_inplace)
    with pytest.raises(StaleRolloutError, match=r"step 2: .* vllm rollout backend's log-probs .* not sampling that adapter"):
        grpo.run(_config(tmp_path, demo, "stale"), log=lambda _: None)
    assert [r["logprob_gap"] < 1e-3 for r in reward_steps(tmp_path / "stale")] == [True]  # step 1 was fine


def test_async_grpo_on_vllm_is_exactly_one_step_stale(demo, engine, tmp_path):
    grpo.run(_config(tmp_path, demo, "async", steps=4, **{"async": True}), log=lambda _: None)
    steps = reward_steps(tmp_path / "async")
    assert [r["staleness"] for r in steps] == [0, 1, 1, 1]  # the first step has no earlier policy
    assert [r["policy_version"] for r in steps] == [0, 0, 1, 2]
    # compared under the adapter that sampled each batch (one version back), the log-probs agree
    assert all(r["logprob_gap"] < 1e-3 for r in steps), [r["logprob_gap"] for r in steps]


def test_merged_sync_loads_fp32_merged_weights(demo, engine, tmp_path):
    tokenizer = load_tokenizer(demo)
    policy = _policy(demo)
    randomize_lora(policy, seed=4, scale=0.3)
    prompts = _prompts(tokenizer)
    expected = [c.token_ids for c in LocalRollout(policy, tokenizer, "default", shares_policy=True).generate(
        prompts, [GREEDY] * len(prompts))]
    merged = VllmRollout(demo, [tokenizer.eos_token_id], lora_rank=None, **ENGINE)
    sampler = PolicySampler(merged, policy, "default")
    try:
        sampler.sync(0)
        got = sampler.generate(prompts, [GREEDY] * len(prompts))
        assert [c.token_ids for c in got] == expected
        for prompt, done in zip(prompts, got):
            gap = (torch.tensor(done.logprobs) - _forward_logprobs(policy, prompt, done.token_ids)).abs().max()
            assert gap < 1e-3, gap
    finally:
        sampler.close()
    assert vllm_rollout._shared["llm"] is None  # a merged vLLM instance holds this run's weights: freed at close


def test_vllm_stops_on_either_eos_like_transformers(tmp_path):
    two_eos = write_two_eos_model(tmp_path / "two-eos", head_dim=32)  # vLLM's CPU attention: head_dim >= 32
    tok = load_tokenizer(str(two_eos))
    eos = collect_eos_ids(tok, load_model(str(two_eos)).generation_config)
    assert len(eos) == 2
    engine = VllmRollout(two_eos, eos, lora_rank=None, **ENGINE)  # base weights: no sync needed
    try:
        for prompt in ("ab", "qr", "chat"):
            ids = _chat_ids(tok, "hi") if prompt == "chat" else tok(prompt, add_special_tokens=False)["input_ids"]
            expected = _hf_greedy(two_eos, ids)
            if prompt != "ab":
                assert expected[-1] == _id(tok, "<|endoftext|>") != tok.eos_token_id
            done = engine.generate([ids], [SamplingParams(max_new_tokens=10)])[0]
            # The stop token is kept (it is trained on), whichever of the two it was; the text leaves it out.
            assert (done.token_ids, done.finish_reason) == (expected, "stop"), prompt
            assert done.text == tok.decode(expected[:-1], skip_special_tokens=True)
    finally:
        engine.close()
