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


def test_a_separate_engine_reports_the_weights_it_holds(demo):
    from lorakit.lora import adapter_state_dict
    from lorakit.rl import adapter_fingerprint

    policy, engine, sampler, prompts = _policy_and_separate_engine(demo)
    with pytest.raises(RuntimeError, match="before sync"):
        sampler.generate(prompts, [GREEDY] * len(prompts))
    randomize_lora(policy, seed=1, scale=0.3)
    sampler.sync(0)
    first = sampler.generate(prompts, [GREEDY] * len(prompts))
    # Oracle: the trainer's own hash of its adapter; the batch carries the engine copy's hash of its weights.
    assert (first.version, first.fingerprint) == (0, adapter_fingerprint(adapter_state_dict(policy)))
    assert sampler.check_batch(first, 0) is None
    assert "expected version 1" in sampler.check_batch(first, 1)

    randomize_lora(policy, seed=2, scale=0.3)
    real_sync = engine.sync
    engine.sync = lambda update: None  # the update never reaches the engine
    sampler.sync(1)
    stale = sampler.generate(prompts, [GREEDY] * len(prompts))
    assert stale.version == 0 and "did not reach the LocalRollout rollout backend" in sampler.check_batch(stale, 1)

    # The engine is told version 2, but its copy is then overwritten by other weights (those of version
    # 1's predecessor): the version matches, the weights it samples with do not.
    engine.sync = real_sync
    randomize_lora(policy, seed=3, scale=0.3)
    sampler.sync(2)
    randomize_lora(engine.engine.model, seed=1, scale=0.3)
    held_back = sampler.generate(prompts, [GREEDY] * len(prompts))
    assert held_back.version == 2 and held_back.fingerprint == first.fingerprint
    assert "reports holding adapter" in sampler.check_batch(held_back, 2)


def test_an_engine_on_the_policy_reports_a_write_after_the_sync(demo):
    tokenizer = load_tokenizer(demo)
    policy = _model(demo)
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    sampler = PolicySampler(LocalRollout(policy, tokenizer, "default", shares_policy=True), policy, "default")
    prompts = _prompts(tokenizer)
    sampler.sync(0)
    assert sampler.check_batch(sampler.generate(prompts, [GREEDY] * len(prompts)), 0) is None
    randomize_lora(policy, seed=5, scale=0.3)  # an optimizer step with no sync after it
    batch = sampler.generate(prompts, [GREEDY] * len(prompts))
    assert "reports holding adapter" in sampler.check_batch(batch, 0)
    sampler.sync(1)
    assert sampler.check_batch(sampler.generate(prompts, [GREEDY] * len(prompts)), 1) is None


def test_the_vllm_hand_over_fingerprint_is_read_back_from_the_files(demo, tmp_path):
    # vLLM itself is not needed: the fingerprint VllmRollout reports is this function of the directory
    # it handed vLLM (vllm_rollout imports vLLM only when an engine is built).
    from lorakit.lora import adapter_state_dict, write_adapter
    from lorakit.rl import adapter_fingerprint
    from lorakit.rl.vllm_rollout import handed_over_fingerprint

    policy = _model(demo)
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    config = adapter_configs(policy)["default"]
    randomize_lora(policy, seed=1, scale=0.3)
    first = adapter_state_dict(policy)
    path = write_adapter(tmp_path / "handed", config, {k: v.to(torch.bfloat16) for k, v in first.items()})
    # bf16 on disk: the hash of what was read is that of the bf16 values, not of the fp32 ones meant
    assert handed_over_fingerprint(path) == adapter_fingerprint({k: v.to(torch.bfloat16) for k, v in first.items()})
    assert handed_over_fingerprint(path) != adapter_fingerprint(first)
    randomize_lora(policy, seed=2, scale=0.3)
    write_adapter(path, config, adapter_state_dict(policy))  # rewritten in place, as each sync does
    assert handed_over_fingerprint(path) == adapter_fingerprint(adapter_state_dict(policy))
