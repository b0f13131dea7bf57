"""The GRPO recipe's named parts: prompt loading, adapters and reference, the rollout backend, sampling seeds."""

import json

import pytest
import torch

import lorakit.recipes.grpo as grpo
from lorakit.config import load_config
from lorakit.distributed import DistInfo
from lorakit.lora import LoraConfig, adapter_configs, inject_lora, save_adapter
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.rl import LocalRollout, ServerRollout, reference_policy

from ..models import randomize_lora


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def warm(demo, tmp_path_factory):
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, scale=0.3, seed=4)
    path = tmp_path_factory.mktemp("adapters") / "warm"
    save_adapter(model, path)
    return path


def _cfg(tmp_path, demo, *overrides, **body):
    base = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "p.jsonl")}, "lora": {"r": 4, "alpha": 8}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**base, **body}))
    return load_config(path, list(overrides))


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[3, 4, 5, 6, 7]])).logits


def test_sampling_seeds_are_a_fixed_function_of_seed_step_slot_and_g():
    assert grpo.sampling_seed(3, 2, 1, 3) == grpo.sampling_seed(3, 2, 1, 3) != grpo.sampling_seed(4, 2, 1, 3)
    seeds = {grpo.sampling_seed(7, 5, slot, g) for slot in range(16) for g in range(16)}
    assert len(seeds) == 256  # every completion of a step gets its own


def test_sampling_seeds_never_repeat_across_steps_with_many_prompts_per_step():
    """128 prompts x 16 completions over 4 steps (a linear mix with strides 10_007 per step and 101 per
    slot gave step s's slot 99+k, completion 8+g the seed of step s+1's slot k, completion g)."""
    seeds = [grpo.sampling_seed(0, step, slot, g) for step in range(4) for slot in range(128) for g in range(16)]
    assert len(set(seeds)) == len(seeds) == 8192
    assert all(0 <= s < 2 ** 63 for s in seeds)  # samplers take signed 64-bit seeds


def test_prompts_are_tokenized_and_a_long_one_is_named(tmp_path, demo):
    tokenizer = load_tokenizer(demo)
    (tmp_path / "p.jsonl").write_text('{"prompt": "12+7=", "answer": "19"}\n{"prompt": "1+1=", "answer": "2"}\n')
    cfg = _cfg(tmp_path, demo, "grpo.chat_template=false")
    lines = []
    records, ids = grpo.load_prompts(cfg, tokenizer, cfg.data.train, "train", lines.append)
    assert [r.fields for r in records] == [{"answer": "19"}, {"answer": "2"}]
    assert ids == [tokenizer("12+7=")["input_ids"], tokenizer("1+1=")["input_ids"]]
    assert lines == [f"train prompts: {cfg.data.train}: 2 (0 invalid lines skipped)"]
    chat = _cfg(tmp_path, demo, "grpo.chat_template=true", "data.system_prompt=Be brief.")
    _, chat_ids = grpo.load_prompts(chat, tokenizer, chat.data.train, "train", lines.append)
    assert "Be brief." in tokenizer.decode(chat_ids[0]) and len(chat_ids[0]) > len(ids[0])
    short = _cfg(tmp_path, demo, "grpo.chat_template=false", f"grpo.max_prompt_len={len(ids[0]) - 1}")
    with pytest.raises(ValueError, match=r"p.jsonl:1: the prompt has \d+ tokens, over grpo.max_prompt_len"):
        grpo.load_prompts(short, tokenizer, short.data.train, "train", lines.append)
    top = max(ids[0])  # a model with no embedding row for this id cannot read "12+7="
    with pytest.raises(ValueError, match=rf"p.jsonl:1: token id {top} is outside the model's vocabulary \({top} embedding"):
        grpo.load_prompts(cfg, tokenizer, cfg.data.train, "train", lines.append, vocab_size=top)


def test_a_new_adapter_has_the_base_as_reference(tmp_path, demo):
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    base = _logits(model)
    assert grpo.attach_adapters(model, _cfg(tmp_path, demo), lambda _: None) is None
    assert list(adapter_configs(model)) == ["default"] and adapter_configs(model)["default"].r == 4
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="grpo.reference=init_adapter needs init_adapter"):
        grpo.attach_adapters(model, _cfg(tmp_path, demo, "grpo.reference=init_adapter"))
    randomize_lora(model, seed=9, scale=0.3)  # training moved the policy; the reference did not
    with reference_policy(model, None, "default"):
        assert torch.allclose(_logits(model), base, atol=1e-6)


def test_an_init_adapter_is_trained_and_a_frozen_copy_is_the_reference(tmp_path, demo, warm):
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    base = _logits(model)
    lines = []
    reference = grpo.attach_adapters(model, _cfg(tmp_path, demo, init_adapter=str(warm)), lines.append)
    assert reference == "reference" and "reference: a frozen copy of it" in lines[0]
    start = _logits(model)  # the policy starts as the warm adapter
    assert not torch.allclose(start, base, atol=1e-4)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad == (".default." in name), name
    with torch.no_grad():  # training moves the trained adapter alone
        for name, p in model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.add_(torch.randn_like(p) * 0.3)
    assert not torch.allclose(_logits(model), start, atol=1e-4)
    with reference_policy(model, reference, "default"):
        assert torch.allclose(_logits(model), start, atol=1e-6)

    vs_base = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    assert grpo.attach_adapters(vs_base, _cfg(tmp_path, demo, "grpo.reference=base", init_adapter=str(warm)),
                                lambda _: None) is None
    assert list(adapter_configs(vs_base)) == ["default"]


def test_the_rollout_backend_follows_the_config(tmp_path, demo):
    tokenizer = load_tokenizer(demo)
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoraConfig(r=4, alpha=8))
    local = grpo.rollout_backend(_cfg(tmp_path, demo), model, tokenizer, DistInfo(), torch.device("cpu"), torch.float32)
    assert isinstance(local.backend, LocalRollout) and local.backend.engine.model is model  # no copy
    server = grpo.rollout_backend(_cfg(tmp_path, demo, "rollout.backend=server", "rollout.base_url=http://127.0.0.1:9/v1",
                                      output_dir=str(tmp_path / "my run.1")),
                                 model, tokenizer, DistInfo(), torch.device("cpu"), torch.float32)
    assert isinstance(server.backend, ServerRollout) and server.backend.name.startswith("my-run-1-")
    assert server.backend.adapter_dir == tmp_path / "my run.1" / "rollout_adapters"


def test_two_runs_with_the_same_output_dir_name_use_different_server_adapter_names(tmp_path, demo):
    """On one shared server, runs a/grpo and b/grpo must not load or unload each other's adapter."""
    tokenizer = load_tokenizer(demo)
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    names = []
    for parent in ("a", "b", "a"):
        cfg = _cfg(tmp_path, demo, "rollout.backend=server", "rollout.base_url=http://127.0.0.1:9/v1",
                   output_dir=str(tmp_path / parent / "grpo"))
        sampler = grpo.rollout_backend(cfg, model, tokenizer, DistInfo(), torch.device("cpu"), torch.float32)
        names.append(sampler.backend.name)
    assert names[0] != names[1] and names[0] == names[2]  # per run, and stable across a resume
    assert all(name.startswith("grpo-") for name in names)


def test_a_tensor_parallel_vllm_instance_under_torchrun_is_refused_before_loading(tmp_path, demo):
    cfg = _cfg(tmp_path, demo, "rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2")
    with pytest.raises(ValueError, match=r"rollout.vllm.tensor_parallel_size=2 with 2 torchrun ranks"):
        grpo.check_rollout_layout(cfg, DistInfo(rank=1, world=2, mode="ddp"))
    grpo.check_rollout_layout(cfg, DistInfo())  # one process: vLLM's own tensor parallelism
    one = _cfg(tmp_path, demo, "rollout.backend=vllm")
    grpo.check_rollout_layout(one, DistInfo(rank=0, world=2, mode="ddp"))  # one vLLM instance per rank
