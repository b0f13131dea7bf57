"""Runs under torchrun (1 or 2 ranks; gloo on CPU, nccl on CUDA) for tests/test_megatron.py.

Every check computes a number (a max abs difference, a count, a flag) into results_rank<r>.json in
--out; the pytest side asserts on them. One launch checks many things: megatron-core's import
and process-group setup cost more than the checks themselves.

CPU shims (test-only; Megatron's own code paths, not lorakit's): see tests/megatron_shared.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--device", default="cpu")
parser.add_argument("--reshard-from", default=None, help="a checkpoint saved with another TP size to reload")
parser.add_argument("--train-only", action="store_true", help="only the GPTModel training check (the GPU test)")
ARGS = parser.parse_args()
DEV = torch.device(ARGS.device if ARGS.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

from tests.megatron_shared import (  # noqa: E402
    export_checks,
    lora_tensors,
    maxdiff,
    randomize_full_lora,
    patch_megatron_for_cpu,
    point_cuda_device_at_cpu,
)

if DEV.type == "cpu":
    point_cuda_device_at_cpu()
else:
    torch.cuda.set_device(DEV)
dist.init_process_group("gloo" if DEV.type == "cpu" else "nccl")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
OUT = Path(ARGS.out) / f"tp{WORLD}"
OUT.mkdir(parents=True, exist_ok=True)

from megatron.core import parallel_state as ps  # noqa: E402

ps.initialize_model_parallel(tensor_model_parallel_size=WORLD)
if DEV.type == "cpu":
    patch_megatron_for_cpu()
else:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)

from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from lorakit import LoraConfig, disable_adapters, inject_lora, merge_lora, unmerge_lora  # noqa: E402
from lorakit.integrations import megatron as mlora  # noqa: E402
from lorakit.integrations.megatron_hf import fuse_qkv  # noqa: E402
from lorakit.lora.parallel import shard_tensor, unshard_tensor  # noqa: E402

RESULTS: dict = {}


def record(name, value):
    RESULTS[name] = float(value) if isinstance(value, (int, float, bool)) or torch.is_tensor(value) else value



def gather(t, dim, stride=1):
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return unshard_tensor(parts, dim, stride)


# --- 1. single layers vs a dense reference ------------------------------------------------------
def layer_checks():
    g = torch.Generator().manual_seed(7)
    s, b, d_in, d_out, r = 8, 2, 16, 24, 4
    for kind in ("column", "row"):
        for sp in (False, True):
            tag = f"{kind}{'_sp' if sp else ''}"
            # float64 end to end: what is left of a difference is the math, not fp32 rounding
            cfg = ModelParallelConfig(tensor_model_parallel_size=WORLD, use_cpu_initialization=True,
                                      sequence_parallel=sp, params_dtype=torch.float64)
            if kind == "column":
                base = ColumnParallelLinear(d_in, d_out, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                            bias=True, gather_output=False)
            else:
                base = RowParallelLinear(d_in, d_out, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                         bias=True, input_is_parallel=True, skip_bias_add=True)
            bias_full = torch.randn(d_out, generator=g, dtype=torch.float64)
            with torch.no_grad():
                base.bias.copy_(shard_tensor(bias_full, 0, RANK, WORLD) if kind == "column" else bias_full)
            base = base.to(DEV)
            w_dim = 0 if kind == "column" else 1
            w_full = gather(base.weight.detach(), w_dim)
            holder = torch.nn.ModuleDict({"layer": base})
            mlora.apply_lora_to_megatron_model(holder, LoraConfig(r=r, alpha=8, target_modules=["layer"]), log=False)
            layer = holder["layer"]
            a_full = torch.randn(r, d_in, generator=g, dtype=torch.float64)
            b_full = torch.randn(d_out, r, generator=g, dtype=torch.float64)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(layer.shard("lora_A", a_full))
                layer.lora_B["default"].weight.copy_(layer.shard("lora_B", b_full))
            # dense reference: nn.Linear + lorakit's LoraLinear, same weights
            dense = torch.nn.ModuleDict({"layer": torch.nn.Linear(d_in, d_out, dtype=torch.float64)})
            with torch.no_grad():
                dense["layer"].weight.copy_(w_full)
                dense["layer"].bias.copy_(bias_full)
            inject_lora(dense, LoraConfig(r=r, alpha=8, target_modules=["layer"]))
            with torch.no_grad():
                dense["layer"].lora_A["default"].weight.copy_(a_full)
                dense["layer"].lora_B["default"].weight.copy_(b_full)
            x_full = torch.randn(s, b, d_in, generator=g, dtype=torch.float64)
            gout_full = torch.randn(s, b, d_out, generator=g, dtype=torch.float64)
            xd = x_full.clone().requires_grad_(True)
            yd = dense["layer"](xd)
            (yd * gout_full).sum().backward()

            if kind == "column":
                x = (shard_tensor(x_full, 0, RANK, WORLD) if sp else x_full).to(DEV).requires_grad_(True)
                y, y_bias = layer(x)
                y_ref = shard_tensor(yd.detach(), 2, RANK, WORLD)
                gout = shard_tensor(gout_full, 2, RANK, WORLD)
                x_grad_ref = shard_tensor(xd.grad, 0, RANK, WORLD) if sp else xd.grad
            else:
                x = shard_tensor(x_full, 2, RANK, WORLD).to(DEV).requires_grad_(True)
                y, y_bias = layer(x)
                y = y + y_bias  # skip_bias_add: the wrapper hands the bias back untouched
                y_ref = shard_tensor(yd.detach(), 0, RANK, WORLD) if sp else yd.detach()
                gout = shard_tensor(gout_full, 0, RANK, WORLD) if sp else gout_full
                x_grad_ref = shard_tensor(xd.grad, 2, RANK, WORLD)
            record(f"layer_{tag}_returns_pair", isinstance((y, y_bias), tuple))
            record(f"layer_{tag}_bias_passthrough", (y_bias is None) == (kind == "column"))
            (y * gout.to(DEV)).sum().backward()
            dl = dense["layer"]
            record(f"layer_{tag}_out", maxdiff(y, y_ref))
            record(f"layer_{tag}_input_grad", maxdiff(x.grad, x_grad_ref))
            record(f"layer_{tag}_A_grad", maxdiff(layer.lora_A["default"].weight.grad,
                                                  layer.shard("lora_A", dl.lora_A["default"].weight.grad)))
            record(f"layer_{tag}_B_grad", maxdiff(layer.lora_B["default"].weight.grad,
                                                  layer.shard("lora_B", dl.lora_B["default"].weight.grad)))
            record(f"layer_{tag}_base_frozen", not layer.base_layer.weight.requires_grad)
            # merge per shard == the dense merge's shard; the output is unchanged; unmerge restores
            merge_lora(holder)
            merge_lora(dense)
            merged_ref = shard_tensor(dl.base_layer.weight.detach(), w_dim, RANK, WORLD)
            record(f"layer_{tag}_merged_weight", maxdiff(layer.base_layer.weight, merged_ref))
            with torch.no_grad():
                y2, b2 = layer(x.detach())
                y2 = y2 + b2 if b2 is not None else y2
            record(f"layer_{tag}_merged_out", maxdiff(y2, y.detach()))
            # disabled while merged: the base layer's own output, and the merged weight untouched
            merged_weight = layer.base_layer.weight.detach().clone()
            with torch.no_grad(), disable_adapters(holder):
                y3, b3 = layer(x.detach())
                y3 = y3 + b3 if b3 is not None else y3
            base_full = F.linear(x_full, w_full, bias_full)
            if kind == "column":
                base_ref = shard_tensor(base_full, 2, RANK, WORLD)
            else:
                base_ref = shard_tensor(base_full, 0, RANK, WORLD) if sp else base_full
            record(f"layer_{tag}_disabled_merged_out", maxdiff(y3, base_ref))
            record(f"layer_{tag}_disabled_keeps_weight", torch.equal(layer.base_layer.weight, merged_weight))
            unmerge_lora(holder)
            record(f"layer_{tag}_unmerged_weight", maxdiff(layer.base_layer.weight, shard_tensor(w_full, w_dim, RANK, WORLD)))


# --- 2. a GPTModel built from a tiny HF Qwen3 ---------------------------------------------------
def hf_model():
    from tests.models import tiny_qwen3

    return tiny_qwen3(seed=0)


def gpt_config(hf):
    c = hf.config
    return TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads, kv_channels=c.head_dim, ffn_hidden_size=c.intermediate_size,
        tensor_model_parallel_size=WORLD, use_cpu_initialization=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps,
        qk_layernorm=True, bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        gradient_accumulation_fusion=False,
    )


def build_gpt(hf, seed=1):
    torch.manual_seed(seed)
    c = hf.config
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    model = GPTModel(config=gpt_config(hf), transformer_layer_spec=get_gpt_layer_local_spec(
        qk_layernorm=True, normalization="RMSNorm"), vocab_size=c.vocab_size,
        max_sequence_length=c.max_position_embeddings, position_embedding_type="rope", rotary_base=rope_theta,
        share_embeddings_and_output_weights=False)
    return model.to(DEV)


def hf_to_megatron(hf):
    """HF Qwen3 weights -> this rank's shards of the GPTModel state dict."""
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    c = hf.config
    out = {}

    def put(key, full, dim=None, stride=1):
        out[key] = full if dim is None else shard_tensor(full, dim, RANK, WORLD, stride)

    put("embedding.word_embeddings.weight", sd["model.embed_tokens.weight"], 0)
    put("decoder.final_layernorm.weight", sd["model.norm.weight"])
    put("output_layer.weight", sd["lm_head.weight"], 0)
    for i in range(c.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        put(m + "input_layernorm.weight", sd[h + "input_layernorm.weight"])
        qkv = fuse_qkv(sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"],
                       sd[h + "self_attn.v_proj.weight"], c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        put(m + "self_attention.linear_qkv.weight", qkv, 0)
        put(m + "self_attention.q_layernorm.weight", sd[h + "self_attn.q_norm.weight"])
        put(m + "self_attention.k_layernorm.weight", sd[h + "self_attn.k_norm.weight"])
        put(m + "self_attention.linear_proj.weight", sd[h + "self_attn.o_proj.weight"], 1)
        put(m + "pre_mlp_layernorm.weight", sd[h + "post_attention_layernorm.weight"])
        fc1 = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
        put(m + "mlp.linear_fc1.weight", fc1, 0, stride=2)
        put(m + "mlp.linear_fc2.weight", sd[h + "mlp.down_proj.weight"], 1)
    return out


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def gpt_logits(model):
    ids = IDS.to(DEV)
    pos = torch.arange(ids.shape[1], device=DEV).unsqueeze(0).expand_as(ids)
    mask = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=DEV).tril().logical_not()
    logits = model(ids, pos, mask)
    return gather(logits.float(), 2)  # vocab-parallel logits -> full vocab


def gpt_loss(model):
    ids = IDS.to(DEV)
    pos = torch.arange(ids.shape[1], device=DEV).unsqueeze(0).expand_as(ids)
    mask = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=DEV).tril().logical_not()
    return model(ids, pos, mask, labels=ids).float().mean()


TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def gpt_checks():
    hf = hf_model()
    base_sd = hf_to_megatron(hf)
    model = build_gpt(hf)
    model.load_state_dict(base_sd, strict=False)  # the only keys left out are Megatron's _extra_state
    missing = [k for k in model.state_dict() if k not in base_sd and not k.endswith("_extra_state")]
    record("gpt_conversion_covers_all_keys", not missing)
    with torch.no_grad():
        ref = hf(IDS).logits
        base_logits = gpt_logits(model)
    record("gpt_base_vs_hf_logits", maxdiff(base_logits, ref))

    try:
        mlora.apply_lora_to_megatron_model([model], LoraConfig(r=4, target_modules=["q_proj"]), log=False)
        record("gpt_bad_target_error", "")
    except ValueError as err:
        record("gpt_bad_target_error", str(err))

    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        mlora.apply_lora_to_megatron_model([model], LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    report = mlora.megatron_lora_report([model])
    record("gpt_report_text", buf.getvalue())
    record("gpt_global_total", report.global_total)
    record("gpt_global_trainable", report.global_trainable)
    record("gpt_rank_trainable", report.rank_trainable)
    record("gpt_wrapped", len(report.wrapped))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    record("gpt_only_lora_trainable", all(".lora_" in n for n in trainable) and len(trainable) == 16)
    with torch.no_grad():
        record("gpt_fresh_lora_is_noop", maxdiff(gpt_logits(model), base_logits))

    # Megatron distributed checkpointing sees the base under its pre-LoRA keys plus LoRA shards
    sharded = model.sharded_state_dict()
    base_keys = {k for k in sharded if ".lora_" not in k}
    plain_keys = {k for k in build_gpt(hf, seed=9).sharded_state_dict()}
    record("dist_ckpt_base_keys_unchanged", base_keys == plain_keys)
    qkv_b = sharded["decoder.layers.0.self_attention.linear_qkv.lora_B.default.weight"]
    proj_a = sharded["decoder.layers.0.self_attention.linear_proj.lora_A.default.weight"]
    record("dist_ckpt_lora_layout", [list(qkv_b.global_shape), list(qkv_b.axis_fragmentations),
                                     list(proj_a.global_shape), list(proj_a.axis_fragmentations),
                                     type(sharded["decoder.layers.0.mlp.linear_fc1.lora_B.default.weight"]).__name__])

    generator = torch.Generator().manual_seed(11)
    randomize_full_lora(model, lambda info: generator)  # one stream over all layers
    with torch.no_grad():
        lora_logits = gpt_logits(model)
    record("gpt_lora_changes_logits", maxdiff(lora_logits, base_logits))
    saved_lora = lora_tensors(model)

    # export -> HF (lorakit and PEFT) reproduces the Megatron-side logits
    adapter_dir = OUT / "adapter"
    for what, value in export_checks(model, adapter_dir, hf_model, IDS, lora_logits, RANK).items():
        record(f"export_{what}_logits" if what != "config" else "export_config", value)

    # per-rank checkpoint, offline export equals the online one
    ckpt = OUT / "ckpt"
    mlora.save_megatron_lora([model], ckpt)
    if RANK == 0:
        from safetensors.torch import load_file

        mlora.export_hf_adapter_from_checkpoint(ckpt, OUT / "adapter_offline")
        on = load_file(str(adapter_dir / "adapter_model.safetensors"))
        off = load_file(str(OUT / "adapter_offline" / "adapter_model.safetensors"))
        record("offline_export_equal", on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on))
    dist.barrier()

    # a fresh model: inject first, then load the LoRA-free base checkpoint (strict=False issue)
    fresh = build_gpt(hf, seed=5)
    mlora.apply_lora_to_megatron_model([fresh], LoraConfig(r=8, alpha=16, target_modules=TARGETS), log=False)
    broken = dict(base_sd)
    broken.pop("decoder.layers.1.mlp.linear_fc2.weight")
    try:
        mlora.load_base_checkpoint(fresh, broken)
        record("base_load_missing_key_error", "")
    except ValueError as err:
        record("base_load_missing_key_error", str(err))
    loaded = mlora.load_base_checkpoint(fresh, base_sd)
    record("base_load_fresh_lora", len(loaded.fresh_lora))
    with torch.no_grad():
        record("base_load_logits", maxdiff(gpt_logits(fresh), base_logits))
    mlora.load_megatron_lora([fresh], ckpt)
    reloaded = lora_tensors(fresh)
    record("reload_same_tp_exact", reloaded.keys() == saved_lora.keys()
           and all(torch.equal(reloaded[k], saved_lora[k]) for k in saved_lora))
    with torch.no_grad():
        record("reload_logits", maxdiff(gpt_logits(fresh), lora_logits))

    if ARGS.reshard_from:
        other = build_gpt(hf, seed=6)
        other.load_state_dict(base_sd, strict=False)
        mlora.apply_lora_to_megatron_model([other], LoraConfig(r=8, alpha=16, target_modules=TARGETS), log=False)
        mlora.load_megatron_lora([other], ARGS.reshard_from)
        with torch.no_grad():
            record("reshard_logits", maxdiff(gpt_logits(other), lora_logits))

    # import the exported HF adapter into a model without LoRA: same shards
    imported = build_gpt(hf, seed=7)
    imported.load_state_dict(base_sd, strict=False)
    mlora.import_hf_adapter([imported], adapter_dir)
    got = lora_tensors(imported)
    record("import_equal", got.keys() == saved_lora.keys()
           and max(maxdiff(got[k], saved_lora[k]) for k in saved_lora) == 0.0)
    with torch.no_grad():
        record("import_logits", maxdiff(gpt_logits(imported), lora_logits))

    # an adapter whose q and v have different A cannot become one fused linear_qkv: refused, and
    # the adapter injected for the import is removed again
    from lorakit.lora.io import read_adapter, write_adapter

    hf_cfg, hf_tensors, _ = read_adapter(adapter_dir)
    hf_tensors["model.layers.0.self_attn.v_proj.lora_A.weight"] = hf_tensors["model.layers.0.self_attn.v_proj.lora_A.weight"] + 1
    write_adapter(OUT / f"broken_rank{RANK}", hf_cfg, {"base_model.model." + k: v for k, v in hf_tensors.items()})
    refused = build_gpt(hf, seed=8)
    try:
        mlora.import_hf_adapter([refused], OUT / f"broken_rank{RANK}")
        record("import_refused", "")
    except ValueError as err:
        record("import_refused", str(err))
    record("import_refused_leaves_no_adapter", not mlora.module_infos([refused]))

    # merge on the shards: same logits; unmerge gives the base back
    merge_lora(model)
    with torch.no_grad():
        record("merge_logits", maxdiff(gpt_logits(model), lora_logits))
    unmerge_lora(model)
    base_now = {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items()
                if ".lora_" not in k and torch.is_tensor(v)}
    record("unmerge_base_restored", max(maxdiff(base_now[k], v) for k, v in base_sd.items()))
    train_check(model, base_now)


def train_check(model, base_sd):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = gpt_loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    record("train_losses", losses)
    state = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if ".lora_" not in k and torch.is_tensor(v)}
    record("train_base_unchanged", all(torch.equal(state[k].cpu(), v.cpu()) for k, v in base_sd.items()))
    # every TP rank holds identical replicated LoRA weights after training (exact gradients)
    same = True
    for _, layer in mlora.module_infos([model]):
        for which, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            if layer.sharded[which] is None:
                w = store["default"].weight.detach()
                parts = [torch.empty_like(w) for _ in range(WORLD)]
                dist.all_gather(parts, w.contiguous())
                same &= all(torch.equal(p, parts[0]) for p in parts)
    record("train_replicated_in_sync", same)


def main():
    try:
        if ARGS.train_only:
            hf = hf_model()
            model = build_gpt(hf)
            base_sd = {k: v.to(DEV) for k, v in hf_to_megatron(hf).items()}
            model.load_state_dict(base_sd, strict=False)
            mlora.apply_lora_to_megatron_model([model], LoraConfig(r=8, alpha=16, target_modules=TARGETS, init_lora_weights=False))
            train_check(model, base_sd)
        else:
            if WORLD > 1:
                layer_checks()
            gpt_checks()
    except Exception:
        record("error", traceback.format_exc())
    (OUT / f"results_rank{RANK}.json").write_text(json.dumps(RESULTS, indent=1))
    dist.barrier()
    dist.destroy_process_group()


main()
