"""The packed-sdpa kernel (``models.packed_attention``): samples end to end in one row give the logits
and gradients each sample gets alone, without transformers' dense (T, T) mask; padded batches and
generation with a KV cache are exactly plain sdpa's."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.models.packed_attention import PACKED_SDPA, register_packed_sdpa, sample_lengths

from .models import tiny_qwen3


class _SdpaShapes(TorchDispatchMode):
    """Records the (query length, key length) of every attention kernel call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.overloadpacket.__name__ and "backward" not in func.overloadpacket.__name__:
            self.shapes.append((args[0].shape[-2], args[1].shape[-2]))
        return func(*args, **(kwargs or {}))


def test_sample_lengths_from_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert sample_lengths(pos) == [[3, 2, 4], [6, 3]]
    assert sample_lengths(torch.tensor([[5, 6, 7]])) == [[3]]  # one sample that does not start at 0


def test_packed_row_equals_each_sample_alone_forward_and_backward():
    model = tiny_qwen3(seed=2).train()
    model.set_attn_implementation(register_packed_sdpa())
    assert model.config._attn_implementation == PACKED_SDPA
    lengths = [7, 3, 9, 1, 5]
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    weight = torch.randn(1, sum(lengths), 128, generator=torch.Generator().manual_seed(1))
    spy = _SdpaShapes()
    with spy:
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (packed * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation("sdpa")  # the oracle: plain sdpa on each sample alone
    start, total = 0, 0.0
    for n in lengths:
        alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
        torch.testing.assert_close(packed[:, start:start + n].detach(), alone.detach(), atol=1e-5, rtol=1e-5)
        total = total + (alone * weight[:, start:start + n]).sum()
        start += n
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
    # one attention call per sample and layer, never one over the whole row
    assert spy.shapes == [(n, n) for _ in range(2) for n in lengths]


def test_padded_batches_and_cached_generation_are_plain_sdpa():
    model = tiny_qwen3(seed=3)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    outputs = {}
    for kernel in ("sdpa", register_packed_sdpa()):
        model.set_attn_implementation(kernel)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        outputs[kernel] = (logits, generated)
    (a, ga), (b, gb) = outputs.values()
    assert torch.equal(a[mask.bool()], b[mask.bool()]) and torch.equal(ga, gb)


def test_sliding_window_layers_equal_each_sample_alone():
    # window 4: the 9-token sample needs the band mask, the 3-token one is plain causal
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    lengths = [9, 3, 6]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    model.set_attn_implementation(register_packed_sdpa())
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    model.set_attn_implementation("sdpa")  # the oracle: transformers' own sliding-window mask, each sample alone
    start = 0
    for n in lengths:
        with torch.no_grad():
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
        torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n
    # the window matters here: full causal attention gives other logits for the long sample
    full = Qwen3ForCausalLM(Qwen3Config(**{**config.to_dict(), "layer_types": ["full_attention"] * 2})).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(input_ids=ids[:, :9], use_cache=False).logits, packed[:, :9], atol=1e-3)
