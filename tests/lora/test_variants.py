"""LoRA variants against the real `peft` package: DoRA, PiSSA/OLoRA, QLoRA (bitsandbytes), LoRA+."""

import copy
import json

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, disable_adapters, inject_lora, load_adapter, merge_lora, save_adapter, unload_lora, unmerge_lora
from lorakit.lora import route_adapters
from lorakit.training import build_optimizer

from ..models import randomize_lora, tiny_gpt2, tiny_qwen3

peft = pytest.importorskip("peft")

QWEN_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj"]


def qwen64(seed: int = 0):
    """A Qwen3 whose layers are multiples of 64 wide: bitsandbytes' 4-bit blocks are 64 values."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- DoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, targets", [(tiny_qwen3, QWEN_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_dora_interop_both_ways(tmp_path, ids, make, targets, rslora):
    ours = make()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, use_rslora=rslora))
    assert (_logits(ours, ids) - _logits(make(), ids)).abs().max() < 1e-6  # a fresh DoRA adapter is a no-op
    randomize_lora(ours, seed=3)
    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert (_logits(theirs, ids) - _logits(ours, ids)).abs().max() < 1e-5

    trained = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                          use_rslora=rslora, init_lora_weights=False)).eval()
    trained.save_pretrained(tmp_path / "peft")
    back = make()
    load_adapter(back, tmp_path / "peft")
    assert (_logits(back, ids) - _logits(trained, ids)).abs().max() < 1e-5


def test_dora_gradients_match_peft(ids):
    """Same loss, same gradients: the norm is a constant in the backward pass, as in PEFT."""
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=QWEN_TARGETS, use_dora=True, init_lora_weights=False))
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QWEN_TARGETS,
                                                               use_dora=True, init_lora_weights=False))
    ours.train(), theirs.train()

    def our_name(name):  # PEFT keeps the magnitude in a module: "...lora_magnitude_vector.default.weight"
        return name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")

    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.base_model.model.named_parameters():
            if p.requires_grad:
                mine[our_name(name)].copy_(p)
    ours(input_ids=ids).logits.square().mean().backward()
    theirs(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in theirs.base_model.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[our_name(name)], p.grad, atol=1e-6, rtol=1e-4), name
            checked += 1
    assert checked == 3 * 2 * 3  # A, B and magnitude of 3 targets x 2 layers


@pytest.mark.parametrize("make, targets", [(tiny_qwen3, QWEN_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["linear", "conv1d"])
def test_dora_merge_and_unmerge_are_exact(ids, make, targets):
    model = make()
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    randomize_lora(model, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = _logits(model, ids)
    merge_lora(model)
    assert (_logits(model, ids) - expected).abs().max() < 1e-5
    unmerge_lora(model)
    assert all((p - before[n]).abs().max() < 1e-6 for n, p in model.named_parameters() if n in before)
    assert (_logits(model, ids) - expected).abs().max() < 1e-6
    plain = unload_lora(model, merge=True)
    assert (_logits(plain, ids) - expected).abs().max() < 1e-5


def test_dora_with_per_row_routing_matches_each_adapter_alone(ids):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=4, target_modules=QWEN_TARGETS, use_dora=True), adapter_name="dora")
    inject_lora(model, LoraConfig(r=4, target_modules=QWEN_TARGETS), adapter_name="plain")
    randomize_lora(model, seed=6)
    from lorakit import set_active_adapters

    alone = {}
    for name in ("dora", "plain"):
        set_active_adapters(model, [name])
        alone[name] = _logits(model, ids)
    with route_adapters(model, ["dora", "plain"]):
        mixed = _logits(model, ids)
    assert (mixed[0] - alone["dora"][0]).abs().max() < 1e-5
    assert (mixed[1] - alone["plain"][1]).abs().max() < 1e-5


def test_dora_norm_is_cached_in_eval_and_follows_weight_changes(ids):
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_lora(model, seed=2)
    layer = model.model.layers[0].self_attn.q_proj
    _logits(model, ids)
    cached = layer.__dict__["_dora_norm"]["default"][1]
    _logits(model, ids)
    assert layer.__dict__["_dora_norm"]["default"][1] is cached  # not recomputed
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2.0)  # an optimizer step changes B in place
    _logits(model, ids)
    fresh = layer.__dict__["_dora_norm"]["default"][1]
    weight = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(fresh, weight.norm(dim=1), rtol=1e-5)


EMBED_TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def _scale_peft_magnitudes(model, seed):
    """PEFT starts each magnitude at the weight norm (a factor of 1): move it, so the magnitude counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_dora_on_an_embedding_interop_both_ways(tmp_path, ids, rslora):
    cfg = dict(r=4, target_modules=EMBED_TARGETS, use_dora=True, use_rslora=rslora)
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(alpha=8, **cfg))
    assert (_logits(ours, ids) - _logits(tiny_qwen3(), ids)).abs().max() < 1e-6  # a fresh DoRA adapter is a no-op
    randomize_lora(ours, seed=5)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_qwen3(), tmp_path / "ours").eval()
    assert (_logits(theirs, ids) - _logits(ours, ids)).abs().max() < 1e-5
    assert (_logits(theirs, ids) - _logits(tiny_qwen3(), ids)).abs().max() > 1e-2  # the adapter does something

    trained = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(lora_alpha=8, init_lora_weights=False, **cfg)).eval()
    _scale_peft_magnitudes(trained, seed=7)
    trained.save_pretrained(tmp_path / "peft", save_embedding_layers=False)  # the adapter only
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_saved.items()}  # same keys, shapes
    assert mine["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (32,)  # per embedding dim
    back = tiny_qwen3()
    load_adapter(back, tmp_path / "peft")
    assert (_logits(back, ids) - _logits(trained, ids)).abs().max() < 1e-5


def test_dora_on_an_embedding_gradients_match_peft(ids):
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(r=4, alpha=8, target_modules=EMBED_TARGETS, use_dora=True, init_lora_weights=False))
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=EMBED_TARGETS,
                                                               use_dora=True, init_lora_weights=False))
    _scale_peft_magnitudes(theirs, seed=8)
    ours.train(), theirs.train()

    def our_name(name):
        return name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")

    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.base_model.model.named_parameters():
            if p.requires_grad:
                mine[our_name(name)].copy_(p)
    ours(input_ids=ids).logits.square().mean().backward()
    theirs(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    checked = []
    for name, p in theirs.base_model.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[our_name(name)], p.grad, atol=1e-6, rtol=1e-4), name
            checked.append(name)
    assert len(checked) == 3 * (1 + 2 * 2)  # A, B and magnitude of the embedding and 2 targets x 2 layers
    assert sum("embed_tokens" in n for n in checked) == 3


def test_dora_on_an_embedding_merge_unmerge_and_disable_are_exact(ids):
    model = tiny_qwen3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=EMBED_TARGETS, use_dora=True))
    randomize_lora(model, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = _logits(model, ids)
    merge_lora(model)
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert (_logits(model, ids) - expected).abs().max() < 1e-5
    with disable_adapters(model):  # merged adapters taken out of the outputs: the base model's logits
        assert (_logits(model, ids) - _logits(base, ids)).abs().max() < 1e-5
    assert all(torch.equal(p, merged_weights[n]) for n, p in model.named_parameters())  # weights untouched
    unmerge_lora(model)
    assert all((p - before[n]).abs().max() < 1e-6 for n, p in model.named_parameters() if n in before)
    assert (_logits(model, ids) - expected).abs().max() < 1e-6
    plain = unload_lora(model, merge=True)
    assert (_logits(plain, ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("make, targets", [(tiny_qwen3, QWEN_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["linear", "conv1d"])
def test_disabling_a_merged_dora_model_gives_the_base_output(ids, make, targets):
    model = make()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True), adapter_name="a")
    inject_lora(model, LoraConfig(r=2, target_modules=targets[:1], use_dora=True), adapter_name="b")
    randomize_lora(model, seed=9)
    merge_lora(model, ["a"])
    merge_lora(model, ["b"])
    with disable_adapters(model):
        assert (_logits(model, ids) - _logits(base, ids)).abs().max() < 1e-5


# --- PiSSA / OLoRA ---------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_residual_init_equals_peft_and_converts_for_the_original_base(tmp_path, ids, init, rslora):
    cfg = dict(r=4, target_modules=QWEN_TARGETS, init_lora_weights=init, use_rslora=rslora)
    torch.manual_seed(11)  # svd_lowrank draws a random start
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(alpha=8, **cfg))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(lora_alpha=8, **cfg))
    mine = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.base_model.model.named_parameters():
        key = name.replace(".default.weight", ".weight") if "base_layer" in name else name
        if "lora_" in name or "base_layer" in name:
            assert torch.equal(mine[key], p), name  # same A, B and residual base, bit for bit
            compared += 1
    assert compared == 6 * 3
    assert (_logits(ours, ids) - _logits(tiny_qwen3(), ids)).abs().max() < 1e-5  # the model is unchanged

    randomize_lora(ours, seed=8, scale=0.05)  # "training"
    trained = _logits(ours, ids)
    save_adapter(ours, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    for loader in ("lorakit", "peft"):
        if loader == "lorakit":
            base = tiny_qwen3()
            load_adapter(base, tmp_path / "converted")
        else:
            base = peft.PeftModel.from_pretrained(tiny_qwen3(), tmp_path / "converted").eval()
        assert (_logits(base, ids) - trained).abs().max() < 1e-5, loader


def test_peft_converted_pissa_adapter_loads_here(tmp_path, ids):
    model = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QWEN_TARGETS,
                                                              init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")  # PEFT's recipe: keep the initial adapter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    trained = _logits(model.eval(), ids)
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = tiny_qwen3()
    load_adapter(ours, tmp_path / "final")
    assert (_logits(ours, ids) - trained).abs().max() < 1e-5


# --- QLoRA -----------------------------------------------------------------------------------
bnb = pytest.importorskip("bitsandbytes")


def _quantized(kind="nf4", seed=0):
    from lorakit.models.quantize import quantize_model

    model = qwen64(seed)
    quantize_model(model, kind)
    return model


# bitsandbytes runs the same 4-bit kernel on both sides, so the only differences are the order of
# the float32 operations of the LoRA branch: 1e-5 on logits of size ~1 (measured: ~1e-7).
QLORA_TOL = 1e-5


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_peft_adapter_loads_here_and_ours_in_peft(tmp_path, ids, kind):
    from transformers import BitsAndBytesConfig

    qwen64().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    bnb_config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.float32) if kind == "nf4"
                  else BitsAndBytesConfig(load_in_8bit=True))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config, device_map="cpu")
    for module in hf.modules():  # see lorakit.lora.quant: keep bitsandbytes' trainable CPU layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=QWEN_TARGETS,
                                                     init_lora_weights=False)).eval()
    assert "bnb" in type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__
    theirs.save_pretrained(tmp_path / "peft")
    ours = _quantized(kind).eval()
    with theirs.disable_adapter():
        assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() == 0  # the same quantized base
    load_adapter(ours, tmp_path / "peft")
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() < QLORA_TOL

    mine = _quantized(kind).eval()
    inject_lora(mine, LoraConfig(r=4, alpha=8, target_modules=QWEN_TARGETS, use_dora=kind == "nf4"))
    randomize_lora(mine, seed=9)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_quantized(kind).eval(), tmp_path / "ours").eval()
    assert (_logits(back, ids) - _logits(mine, ids)).abs().max() < QLORA_TOL


def test_qlora_gradients_equal_those_on_the_dequantized_base(ids):
    """Also after an eval forward (bitsandbytes' CPU repacking must not cut the backward pass)."""
    from lorakit.lora.quant import dequantize_model

    quantized = _quantized()
    plain = _quantized()
    dequantize_model(plain)
    for model in (quantized, plain):
        torch.manual_seed(4)
        inject_lora(model, LoraConfig(r=4, target_modules=QWEN_TARGETS, init_lora_weights=False))
        _logits(model.eval(), ids)
        model.train()
        model(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in quantized.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name], atol=1e-5, rtol=1e-3), name
    assert all(p.dtype == torch.float32 for p in quantized.parameters() if p.requires_grad)


def test_qlora_merge_refuses_quantized_weights_and_dequantizing_merges_exactly(ids):
    from lorakit.lora.quant import dequantize_model

    model = _quantized()
    inject_lora(model, LoraConfig(r=4, target_modules=QWEN_TARGETS))
    randomize_lora(model)
    expected = _logits(model, ids)
    with pytest.raises(ValueError, match=r"its base is quantized \(nf4\); dequantize the model first"):
        merge_lora(model)
    assert dequantize_model(model)  # also the layers under LoRA wrappers
    merge_lora(model)
    assert (_logits(model, ids) - expected).abs().max() < 1e-5


def test_qlora_base_memory_is_under_a_third_of_bf16():
    from lorakit.models.quantize import base_memory_bytes, quantize_model

    model = qwen64()
    linear = [m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
    bf16 = sum(m.weight.numel() * 2 for m in linear)
    before = base_memory_bytes(model)
    quantize_model(model, "nf4")
    assert (base_memory_bytes(model) - (before - sum(m.weight.numel() * 4 for m in linear))) <= 0.3 * bf16


def test_pissa_on_a_quantized_base_is_refused():
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrites the base weights, but module"):
        inject_lora(_quantized(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


# --- LoRA+ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_loraplus_groups_and_rates_equal_peft(use_dora):
    from peft.optimizers import create_loraplus_optimizer

    cfg = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=use_dora)
    ours = tiny_qwen3()
    inject_lora(ours, LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(**cfg))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)

    def rates(model, optimizer, prefix=""):
        # PEFT holds a magnitude in a module: "...lora_magnitude_vector.default.weight"
        names = {id(p): n.removeprefix(prefix).removesuffix("lora_magnitude_vector.default.weight")
                 + ("lora_magnitude_vector.default" if n.endswith("lora_magnitude_vector.default.weight") else "")
                 for n, p in model.named_parameters()}
        return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}

    theirs_rates = rates(theirs, reference, "base_model.model.")
    ours_rates = rates(ours, build_optimizer(ours, 1e-3, 0.0, 16.0))
    assert ours_rates == theirs_rates
    assert {v for k, v in ours_rates.items() if "lora_B" in k} == {16e-3}
    assert {v for k, v in ours_rates.items() if "lora_embedding" in k} == {1e-6}


def test_loraplus_puts_dora_magnitude_with_b():
    model = tiny_qwen3()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    groups = {g["name"]: g for g in build_optimizer(model, 1e-3, 0.01, 4.0).param_groups}
    assert groups["B"]["lr"] == 4e-3 and len(groups["B"]["params"]) == 2 * 2  # lora_B + magnitude, 2 layers
    assert groups["A"]["lr"] == 1e-3 and len(groups["A"]["params"]) == 2


def test_inspect_names_the_variant_and_vllm_check_flags_dora_and_unconverted_pissa(tmp_path, capsys):
    from lorakit.cli import main

    dora = tiny_qwen3()
    inject_lora(dora, LoraConfig(r=8, target_modules=["q_proj"], use_dora=True, use_rslora=True))
    save_adapter(dora, tmp_path / "dora")
    assert main(["inspect", str(tmp_path / "dora"), "--check", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "variant: DoRA + rsLoRA" in out and "vLLM does not serve DoRA unmerged" in out

    pissa = tiny_qwen3()
    inject_lora(pissa, LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    save_adapter(pissa, tmp_path / "raw", convert_to_lora=False)
    save_adapter(pissa, tmp_path / "converted")
    assert main(["inspect", str(tmp_path / "raw"), "--check", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "pissa init, NOT converted" in out and "only fits the residual base" in out
    assert main(["inspect", str(tmp_path / "converted"), "--check", "vllm"]) == 0
    assert "variant: LoRA" in capsys.readouterr().out


def test_dora_and_modules_to_save_on_the_same_module_is_refused():
    with pytest.raises(ValueError, match=r"use_dora with modules_to_save: module 'model.layers.0.self_attn.q_proj'"):
        inject_lora(tiny_qwen3(), LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"], use_dora=True))
