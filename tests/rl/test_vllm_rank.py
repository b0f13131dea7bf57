"""The rank vLLM is built for (max_lora_rank) fits the adapter it will receive, or the config is refused
before any model loads. Needs no vLLM: the vLLM instance itself is replaced by a recorder of its arguments.

Oracle: the ranks of the tensors ``final_adapter`` hands over (PiSSA converted to plain LoRA)."""

import json

import pytest
import torch

import lorakit.recipes.grpo as grpo
from lorakit.config import load_config
from lorakit.config.loader import ConfigError
from lorakit.distributed import DistInfo
from lorakit.lora import final_adapter
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.rl.vllm_rollout import vllm_lora_rank

from .grpo_runs import ROOT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _config(tmp_path, demo, sync="lora", **lora):
    body = {"recipe": "grpo", "model": str(demo), "output_dir": str(tmp_path / "out"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora},
            "grpo": {"prompts_per_step": 2, "beta": 0.0, "log_kl": False},
            "rollout": {"backend": "vllm", "sync": sync, "num_generations": 2}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(body))
    return load_config(tmp_path / "cfg.yaml")


@pytest.mark.parametrize("lora, rank", [({"r": 8, "init_lora_weights": "pissa"}, 16),
                                        ({"r": 4, "rank_pattern": {"v_proj": 12}}, 12)])
def test_the_vllm_instance_is_built_for_the_rank_it_receives(tmp_path, demo, monkeypatch, lora, rank):
    cfg = _config(tmp_path, demo, **lora)
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    grpo.attach_adapters(model, cfg, log=lambda _: None)
    handed_over = max(v.shape[0] for k, v in final_adapter(model, grpo.ADAPTER)[1].items() if "lora_A" in k)
    assert handed_over == rank
    built = {}
    monkeypatch.setattr(grpo, "VllmRollout", lambda *args, **kwargs: built.update(rank=args[2]))
    grpo.rollout_backend(cfg, model, load_tokenizer(demo), DistInfo(), torch.device("cpu"), torch.float32)
    assert vllm_lora_rank(built["rank"]) >= handed_over  # vLLM's max_lora_rank bucket holds every module's rank


@pytest.mark.parametrize("lora, named", [({"r": 300, "init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                                         ({"r": 8, "rank_pattern": {"v_proj": 600}}, "rank_pattern up to 600")])
def test_a_rank_vllm_cannot_serve_is_a_config_error(tmp_path, demo, lora, named):
    with pytest.raises(ConfigError, match=rf"'lora.r' .*{named}.* rank-\d+ adapter, over 512.*rollout.sync: merged"):
        _config(tmp_path, demo, **lora)
    assert _config(tmp_path, demo, sync="merged", **lora).rollout.sync == "merged"  # merged weights have no rank limit


@pytest.mark.parametrize("router", ["mlp.gate.weight", "mlp.router.weight"])
def test_lora_on_a_router_under_vllm_lora_sync_is_a_config_error(tmp_path, demo, router):
    # vLLM's LoRA has a form for MoE expert weights only: the hand-over would fail at the first sync,
    # after the model (and vLLM) loaded; the config is refused before, naming the parameter and the way out.
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with pytest.raises(ConfigError, match=rf"'lora.target_parameters'.*'{router}'.*rollout.sync: merged"):
        _config(tmp_path, demo, r=4, target_parameters=[*experts, router])
    assert _config(tmp_path, demo, r=4, target_parameters=experts).lora.target_parameters == experts
    assert _config(tmp_path, demo, sync="merged", r=4, target_parameters=[router]).rollout.sync == "merged"


def test_an_init_adapter_with_router_lora_under_vllm_lora_sync_is_refused_before_loading(tmp_path, demo):
    init = tmp_path / "init"
    init.mkdir()
    (init / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "target_parameters": ["mlp.experts.down_proj", "mlp.gate.weight"]}))
    cfg = _config(tmp_path, demo, r=4)
    cfg.init_adapter = str(init)
    with pytest.raises(ValueError, match=r"init_adapter .*'mlp.gate.weight' is not an MoE expert weight.*sync: merged"):
        grpo.run(cfg, log=lambda _: None)
