"""A mixed-adapter training step (rows of several adapters in one batch, ``route_adapters``) gives
each adapter exactly the gradient its rows give it alone, and, when each adapter's rows are next to
each other, does so on views of the batch: no row is gathered or scattered, forward or backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, inject_lora, route_adapters, set_active_adapters
from lorakit.lora import adapter_order

from ..models import randomize_lora, tiny_qwen3

# Four adapters of different ranks and targets; 'idle' has no row in the batch.
ADAPTERS = {
    "wide": LoraConfig(r=8, alpha=16, target_modules="all-linear"),
    "attn": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp": LoraConfig(r=2, alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "idle": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
}
# Uneven row counts (3, 1, 2, 0) and one row on the base model.
ROWS = ["wide", "wide", "wide", "attn", "mlp", "mlp", None]


class _Ops(TorchDispatchMode):
    """Records the aten ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model():
    model = tiny_qwen3(seed=3)
    for name, cfg in ADAPTERS.items():
        inject_lora(model, cfg, adapter_name=name)
    randomize_lora(model, seed=5, scale=0.2)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model.train()


def _row_losses(model, ids):
    """(rows,) summed next-token cross-entropy of each row."""
    logits = model(input_ids=ids).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.view(ids.shape[0], -1).sum(-1)


def _grads(model, name):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if n.split(".")[-2] == name}


def _alone(model, ids, rows):
    """Each adapter's gradient from a step on its own rows with only that adapter active (the oracle)."""
    grads = {}
    for name in ADAPTERS:
        model.zero_grad(set_to_none=True)
        mine = [i for i, r in enumerate(rows) if r == name]
        if mine:
            set_active_adapters(model, [name])
            _row_losses(model, ids[mine]).sum().backward()
        grads[name] = _grads(model, name)
    set_active_adapters(model, list(ADAPTERS))
    model.zero_grad(set_to_none=True)
    return grads


def _check_same(mixed, alone):
    for name in ADAPTERS:
        for key, ref in alone[name].items():
            got = mixed[name][key]
            if ref is None:  # no row of this adapter: no gradient, or an exactly zero one
                assert got is None or not got.any(), key
            else:
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("order", ["grouped", "interleaved"])
def test_mixed_step_gives_each_adapter_its_gradient_alone(order):
    model = _model()
    ids = torch.randint(0, 128, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
    rows = ROWS if order == "grouped" else [ROWS[i] for i in (0, 3, 4, 1, 6, 5, 2)]
    if order == "interleaved":
        ids = ids[[0, 3, 4, 1, 6, 5, 2]]
    alone = _alone(model, ids, rows)
    ops = _Ops()
    with route_adapters(model, rows), ops:
        losses = _row_losses(model, ids)
        losses.sum().backward()
    _check_same({name: _grads(model, name) for name in ADAPTERS}, alone)
    assert all(alone[n][k] is not None and alone[n][k].abs().sum() > 0 for n in ("wide", "attn", "mlp") for k in alone[n])
    gathers = ops.names & {"index_select", "index_add", "index_add_", "index", "index_put_", "scatter_add"}
    if order == "grouped":  # each adapter's rows are one block: views only
        assert not gathers, gathers
    else:  # rows of one adapter apart: gathered and scattered back (same gradients)
        assert gathers


def test_mixed_step_per_token_blocks_gives_each_adapter_its_gradient_alone():
    """Several adapters' tokens end to end in one row (how ``jobs:`` packs a micro-batch): each
    adapter's block of tokens gets the update it gets alone, on views of the row."""
    model = _model()
    layer = model.model.layers[0].mlp.down_proj  # on 'wide' and 'mlp'; 'attn' tokens pass through
    x = torch.randn(1, 11, layer.in_features, generator=torch.Generator().manual_seed(1))
    names = ["mlp"] * 4 + ["attn"] * 2 + ["wide"] * 5
    weight = torch.randn(1, 11, layer.out_features, generator=torch.Generator().manual_seed(2))
    ref = torch.empty(1, 11, layer.out_features)
    grads = {}
    for name, (start, stop) in (("mlp", (0, 4)), ("attn", (4, 6)), ("wide", (6, 11))):
        set_active_adapters(model, [name])
        out = layer(x[:, start:stop])
        ref[:, start:stop] = out.detach()
        if name in layer.r:
            (out * weight[:, start:stop]).sum().backward()
            grads[name] = (layer.lora_A[name].weight.grad.clone(), layer.lora_B[name].weight.grad.clone())
        model.zero_grad(set_to_none=True)
    set_active_adapters(model, list(ADAPTERS))
    ops = _Ops()
    with route_adapters(model, names), ops:
        out = layer(x)
        (out * weight).sum().backward()
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
    for name, (ga, gb) in grads.items():
        torch.testing.assert_close(layer.lora_A[name].weight.grad, ga, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B[name].weight.grad, gb, atol=1e-5, rtol=1e-5)
    assert not ops.names & {"index_select", "index_add", "index_add_", "index"}, ops.names


def test_mixed_step_with_trained_copies_of_the_head():
    """modules_to_save copies (the head here) on two adapters: each row's logits come from its own
    adapter's copy and each copy's gradient is what its rows give it alone."""
    model = tiny_qwen3(seed=4)
    for name, seed in (("a", 1), ("b", 2)):
        inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name=name)
        randomize_lora(model, seed=seed, scale=0.2)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "modules_to_save" in n)
    model.train()
    ids = torch.randint(0, 128, (5, 7), generator=torch.Generator().manual_seed(3))
    rows = ["a", "a", "b", "b", "b"]
    ref = {}
    for name, mine in (("a", [0, 1]), ("b", [2, 3, 4])):
        set_active_adapters(model, [name])
        _row_losses(model, ids[mine]).sum().backward()
        ref[name] = {n: p.grad.clone() for n, p in model.named_parameters() if n.split(".")[-2] == name and p.grad is not None}
        model.zero_grad(set_to_none=True)
    set_active_adapters(model, ["a"])
    with route_adapters(model, rows):
        _row_losses(model, ids).sum().backward()
    for name in ("a", "b"):
        assert any("modules_to_save" in k for k in ref[name])
        for key, value in ref[name].items():
            torch.testing.assert_close(dict(model.named_parameters())[key].grad, value, atol=1e-5, rtol=1e-5, msg=key)


def test_adapter_order_groups_rows_stably():
    rows = ["b", None, "a", "b", "a", None, "b"]
    order = adapter_order(rows)
    assert order == [0, 3, 6, 1, 5, 2, 4]
    assert [rows[i] for i in order] == ["b", "b", "b", None, None, "a", "a"]
    assert adapter_order([]) == []
