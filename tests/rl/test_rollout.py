"""PolicySampler with the local engine: it samples the policy's adapter as of the last sync, once per step.

Oracle: transformers' own greedy ``generate`` on the policy model.
"""

import pytest
import torch

from lorakit.generation import SamplingParams
from lorakit.lora import LoraConfig, adapter_configs, inject_lora
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.rl import LocalRollout, PolicySampler

from ..models import randomize_lora

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _model(demo):
    return load_model(demo, dtype=torch.float32, device=torch.device("cpu"))


def _hf_greedy(model, tokenizer, prompt):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def _prompts(tokenizer):
    return [tokenizer("12+7=")["input_ids"], tokenizer("3+4=")["input_ids"]]


def test_an_engine_on_the_policy_itself_needs_no_copy(demo):
    tokenizer = load_tokenizer(demo)
    policy = _model(demo)
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    sampler = PolicySampler(LocalRollout(policy, tokenizer, "default"), policy, "default")
    prompts = _prompts(tokenizer)
    for seed in (1, 2):
        randomize_lora(policy, seed=seed, scale=0.3)  # an update
        sampler.sync(seed)
        done = sampler.generate(prompts, [GREEDY] * len(prompts))
        assert [d.token_ids for d in done] == [_hf_greedy(policy, tokenizer, p) for p in prompts]


def _policy_and_separate_engine(demo):
    """A LoRA policy, a local engine on its own copy of the base (same adapter config, frozen), the
    sampler between them, and the test prompts."""
    tokenizer = load_tokenizer(demo)
    policy = _model(demo)
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    copy = _model(demo)
    inject_lora(copy, adapter_configs(policy)["default"], trainable=False)
    engine = LocalRollout(copy, tokenizer, "default")
    return policy, engine, PolicySampler(engine, policy, "default"), _prompts(tokenizer)


def test_a_separate_engine_model_gets_the_adapter_once_per_step(demo):
    tokenizer = load_tokenizer(demo)
    policy, engine, sampler, prompts = _policy_and_separate_engine(demo)

    def sampled():
        return [d.token_ids for d in sampler.generate(prompts, [GREEDY] * len(prompts))]

    randomize_lora(policy, seed=1, scale=0.3)
    first = [_hf_greedy(policy, tokenizer, p) for p in prompts]
    sampler.sync(0)
    assert sampled() == first
    randomize_lora(policy, seed=2, scale=0.3)
    second = [_hf_greedy(policy, tokenizer, p) for p in prompts]
    assert second != first  # the update changes greedy completions, so the checks below can fail
    sampler.sync(0)
    assert sampled() == first  # step 0 was already synced: the engine keeps that adapter
    sampler.sync(1)
    assert sampled() == second


def test_batches_carry_the_synced_version_and_fingerprint(demo):
    from lorakit.lora import adapter_state_dict
    from lorakit.rl import adapter_fingerprint

    policy, engine, sampler, prompts = _policy_and_separate_engine(demo)
    with pytest.raises(RuntimeError, match="before sync"):
        sampler.generate(prompts, [GREEDY] * len(prompts))
    randomize_lora(policy, seed=1, scale=0.3)
    sampler.sync(0)
    first = sampler.generate(prompts, [GREEDY] * len(prompts))
    assert (first.version, first.fingerprint) == (0, adapter_fingerprint(adapter_state_dict(policy)))
    assert sampler.check_batch(first, 0) is None
    assert "expected version 1" in sampler.check_batch(first, 1)

    randomize_lora(policy, seed=2, scale=0.3)
    fingerprint = adapter_fingerprint(adapter_state_dict(policy))
    assert fingerprint != first.fingerprint  # a different adapter hashes differently
    engine.sync = lambda update: None  # the update never reaches the engine
    sampler.sync(1)
    stale = sampler.generate(prompts, [GREEDY] * len(prompts))
    assert stale.version == 0 and "did not reach the LocalRollout engine" in sampler.check_batch(stale, 1)
    # an engine that records the new version but holds other weights: caught by the fingerprint
    stale.version = 1
    assert "fingerprint" in sampler.check_batch(stale, 1)
