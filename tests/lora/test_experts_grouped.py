"""Expert LoRA as grouped GEMMs through transformers' experts interface: op counts at the shape users
have (128 experts, top-8), every implementation against PEFT, and loud refusals instead of fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, adapter_state_dict, inject_lora, save_adapter
from tests.models import randomize_lora, tiny_moe

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61], [1, 2, 3, 4, 5, 6, 7]])


class OpCount(TorchDispatchMode):
    """Counts the aten ops that run (each one a kernel launch on an accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def qwen3_moe_layer(implementation: str = "grouped_mm"):
    """One Qwen3-MoE layer with Qwen3-30B-A3B's routing: 128 experts, top-8 (small widths)."""
    torch.manual_seed(0)
    config = T.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_experts=128, num_experts_per_tok=8, max_position_embeddings=64)
    model = T.Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(implementation)
    return model


def train_step_ops(model) -> OpCount:
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()  # warm-up: lazy initialisation is not per step
    with OpCount() as ops:
        model(ids, labels=ids).loss.backward()
    return ops


def decode_step_ops(model) -> OpCount:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with OpCount() as ops:
            model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return ops


@pytest.mark.parametrize("targets", ["experts", "all-linear"])
def test_expert_lora_step_costs_at_most_twice_the_base_ops(targets):
    # Issue 25 item 1: a loop over 128 experts ran ~22x the base's ops per training step (8,259 vs 370
    # here) and 4.5x per decoded token. The base step is a full fine-tune step (forward + backward).
    kwargs = dict(target_modules=[], target_parameters=EXPERTS) if targets == "experts" else {}
    base, lora = qwen3_moe_layer(), qwen3_moe_layer()
    inject_lora(lora, LoraConfig(r=16, alpha=32, **kwargs))
    train_base, train_lora = train_step_ops(base), train_step_ops(lora)
    assert train_lora.count <= 2 * train_base.count, (train_lora.count, train_base.count)
    decode_base, decode_lora = decode_step_ops(base), decode_step_ops(lora)
    assert decode_lora.count <= 2 * decode_base.count, (decode_lora.count, decode_base.count)
    # No op count that grows with the experts: the same grouped kernel as the base, a few more times.
    assert train_lora.ops.get("aten._grouped_mm.default", 0) > train_base.ops["aten._grouped_mm.default"]
    assert train_lora.ops.get("aten._local_scalar_dense.default", 0) == 0  # no .tolist()/.item(): no host sync


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_each_experts_implementation_matches_peft(tmp_path, family, implementation):
    model = tiny_moe(family)
    model.set_experts_implementation(implementation)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS))
    randomize_lora(model)
    with torch.no_grad():
        ours = model(IDS).logits
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_moe(family), str(tmp_path)).eval()
    with torch.no_grad():
        want = theirs(IDS).logits
    assert torch.allclose(ours, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("r", [1, 3, 16])
def test_ranks_off_the_kernel_alignment_and_float64_match_peft(tmp_path, r):
    # r * 4 bytes not a multiple of 16 pads the rank with zeros; float64 has no grouped kernel and
    # takes the fallback: both exact against PEFT's merged-delta computation.
    for dtype in (torch.float32, torch.float64):
        model = tiny_moe("qwen3_moe").to(dtype)
        inject_lora(model, LoraConfig(r=r, alpha=8, target_modules=[], target_parameters=EXPERTS))
        randomize_lora(model)
        with torch.no_grad():
            ours = model(IDS).logits
        save_adapter(model, tmp_path)
        oracle = tiny_moe("qwen3_moe").to(dtype)
        oracle.set_experts_implementation("eager")  # transformers' grouped_mm has no float64 either
        theirs = peft.PeftModel.from_pretrained(oracle, str(tmp_path)).eval()
        with torch.no_grad():
            want = theirs(IDS).logits
        assert torch.allclose(ours, want, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0), (r, dtype)


def test_gradients_match_peft():
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS))
    randomize_lora(model)
    theirs = peft.get_peft_model(tiny_moe("qwen3_moe"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                                         target_parameters=EXPERTS))
    peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in adapter_state_dict(model).items()})
    for m in (model, theirs):
        m(IDS).logits.square().mean().backward()
    ours = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
            for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours.keys() == want.keys() and ours
    for name in ours:
        assert torch.allclose(ours[name], want[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("flag", ["has_gate", "has_bias", "is_transposed", "_apply_gate"])
def test_missing_interface_flags_fail_instead_of_falling_back(flag):
    # The fast path reads transformers' experts-interface flags; a release without one must fail
    # loudly (naming it), not silently switch to a slower computation.
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    if flag == "_apply_gate":  # a hook the decorator puts on the class
        saved = type(experts)._apply_gate
        del type(experts)._apply_gate
    else:
        delattr(experts, flag)
    try:
        with pytest.raises(ValueError, match=f"model.layers.0.mlp.experts.*lacks {flag}"):
            inject_lora(model, LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    finally:
        if flag == "_apply_gate":
            type(experts)._apply_gate = saved


def test_flag_removed_after_injection_fails_on_forward():
    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(r=4, init_lora_weights=False, target_modules=[], target_parameters=EXPERTS))
    del model.model.layers[1].mlp.experts.base_layer.base_layer.has_gate
    with pytest.raises(RuntimeError, match="model.layers.1.mlp.experts: .*lacks has_gate"):
        model(IDS)


def test_an_implementation_that_would_skip_the_lora_is_refused():
    # A fused kernel (deepgemm, sonicmoe, a user-registered one) reads only the base weights.
    model = tiny_moe("qwen3_moe")
    model.config._experts_implementation_internal = "sonicmoe"
    with pytest.raises(ValueError, match="experts_implementation 'sonicmoe' .* would skip the LoRA"):
        inject_lora(model, LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))

    model = tiny_moe("qwen3_moe")
    inject_lora(model, LoraConfig(r=4, init_lora_weights=False, target_modules=[], target_parameters=EXPERTS))
    model.config._experts_implementation_internal = "deepgemm"  # switched after injection
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.experts: experts_implementation 'deepgemm'"):
        model(IDS)


def test_hub_kernels_are_refused_at_injection():
    # gpt-oss's MegaBlocks hub kernel replaces the whole MoE block and reads the expert weights itself.
    model = tiny_moe("gpt_oss")
    model._use_kernels = True
    with pytest.raises(ValueError, match="use_kernels.*skip the LoRA"):
        inject_lora(model, LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], target_parameters=[]))  # attention only: fine
