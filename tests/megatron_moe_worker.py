"""Runs under torchrun (1 or 2 ranks, gloo on CPU) for tests/test_megatron_moe.py.

A megatron-core GPTModel with MoE layers (SequentialMLP experts, allgather dispatcher) built from a
tiny HF Qwen3-MoE's weights, with expert parallelism over all ranks (EP = world size, TP = 1), or
with ``--etp`` tensor parallelism over all ranks for the experts too (TP = expert-TP = world size).
Every check writes a number or flag into results_rank<r>.json in --out/ep<EP>; the pytest side
asserts on them. CPU shims: tests/megatron_shared.py.
"""

from __future__ import annotations

import argparse
import json
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

from tests.megatron_shared import (  # noqa: E402
    export_checks,
    lora_tensors,
    maxdiff,
    randomize_full_lora,
    patch_megatron_for_cpu,
    point_cuda_device_at_cpu,
)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--etp", action="store_true", help="TP = expert-TP = world size, EP = 1")
parser.add_argument("--other-layout", default=None, help="a checkpoint saved at another EP size (must be refused)")
ARGS = parser.parse_args()
point_cuda_device_at_cpu()
dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
TP, EP = (WORLD, 1) if ARGS.etp else (1, WORLD)
OUT = Path(ARGS.out) / (f"etp{WORLD}" if ARGS.etp else f"ep{WORLD}")
OUT.mkdir(parents=True, exist_ok=True)

from megatron.core import parallel_state as ps  # noqa: E402

ps.initialize_model_parallel(tensor_model_parallel_size=TP, expert_model_parallel_size=EP,
                             expert_tensor_parallel_size=TP)
patch_megatron_for_cpu()

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from lorakit import LoraConfig, merge_lora, unmerge_lora  # noqa: E402
from lorakit.integrations import megatron as mlora  # noqa: E402
from lorakit.integrations.megatron_hf import fuse_qkv  # noqa: E402
from lorakit.lora.parallel import shard_tensor, unshard_tensor  # noqa: E402

RESULTS: dict = {}
EXPERTS, TOP_K = 4, 2
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def record(name, value):
    RESULTS[name] = float(value) if isinstance(value, (int, float, bool)) or torch.is_tensor(value) else value



def hf_model():
    from tests.models import tiny_moe

    return tiny_moe("qwen3_moe", seed=0, experts=EXPERTS, top_k=TOP_K)


def build(hf, seed=1):
    c = hf.config
    config = TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads, kv_channels=c.head_dim, ffn_hidden_size=c.intermediate_size,
        tensor_model_parallel_size=TP, expert_model_parallel_size=EP, expert_tensor_parallel_size=TP,
        use_cpu_initialization=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps,
        qk_layernorm=True, bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        gradient_accumulation_fusion=False, num_moe_experts=c.num_experts, moe_router_topk=c.num_experts_per_tok,
        moe_ffn_hidden_size=c.moe_intermediate_size, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        # HF Qwen3-MoE: softmax over all experts, then top-k (renormalised only with norm_topk_prob)
        moe_router_pre_softmax=not c.norm_topk_prob, moe_router_dtype="fp64",
    )
    torch.manual_seed(seed)
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    spec = get_gpt_layer_local_spec(num_experts=c.num_experts, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=c.vocab_size,
                     max_sequence_length=c.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=rope_theta, share_embeddings_and_output_weights=False)
    # eval mode (dropout is 0 anyway): megatron-core refuses to *train* MoE with TP > 1 without
    # sequence parallelism, which its local (CPU) layer spec does not offer; gradients are the same.
    return model.eval()


def hf_to_megatron(hf):
    """HF Qwen3-MoE weights -> this rank's GPTModel state dict (its experts only, its TP shards)."""
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    c = hf.config
    local = c.num_experts // EP
    tp_rank = RANK if TP > 1 else 0

    def split(full, dim, stride=1):
        return shard_tensor(full, dim, tp_rank, TP, stride)

    out = {"embedding.word_embeddings.weight": split(sd["model.embed_tokens.weight"], 0),
           "decoder.final_layernorm.weight": sd["model.norm.weight"],
           "output_layer.weight": split(sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = split(fuse_qkv(
            sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"], sd[h + "self_attn.v_proj.weight"],
            c.num_attention_heads, c.num_key_value_heads, c.head_dim), 0)
        out[m + "self_attention.q_layernorm.weight"] = sd[h + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = sd[h + "self_attn.k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = split(sd[h + "self_attn.o_proj.weight"], 1)
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[m + "mlp.router.weight"] = sd[h + "mlp.gate.weight"]
        for j in range(local):
            e = (0 if TP > 1 else RANK) * local + j
            out[m + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = split(sd[h + "mlp.experts.gate_up_proj"][e], 0, 2)
            out[m + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = split(sd[h + "mlp.experts.down_proj"][e], 1)
    return out


def logits(model):
    pos = torch.arange(IDS.shape[1]).unsqueeze(0).expand_as(IDS)
    mask = torch.ones(1, 1, IDS.shape[1], IDS.shape[1], dtype=torch.bool).tril().logical_not()
    out = model(IDS, pos, mask).float()
    if TP == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(TP)]
    dist.all_gather(parts, out.contiguous())
    return unshard_tensor(parts, 2)  # vocab-parallel logits -> full vocab


def loss(model):
    pos = torch.arange(IDS.shape[1]).unsqueeze(0).expand_as(IDS)
    mask = torch.ones(1, 1, IDS.shape[1], IDS.shape[1], dtype=torch.bool).tril().logical_not()
    return model(IDS, pos, mask, labels=IDS).float().mean()


ROLE_IDS = {"qkv": 1, "proj": 2, "fc1": 3, "fc2": 4, "expert_fc1": 5, "expert_fc2": 6}


def layer_generator(info):
    """A seed of (layer, role, global expert): the same LoRA weights at any parallel layout."""
    return torch.Generator().manual_seed(1000 * info.layer + 10 * ROLE_IDS[info.role] + 100 * (info.expert + 1))


def checks():
    hf = hf_model()
    base_sd = hf_to_megatron(hf)
    model = build(hf)
    model.load_state_dict(base_sd, strict=False)
    missing = [k for k in model.state_dict() if k not in base_sd and not k.endswith("_extra_state")]
    record("conversion_covers_all_keys", not missing)
    with torch.no_grad():
        ref = hf(IDS).logits
        base_logits = logits(model)
    record("base_vs_hf_logits", maxdiff(base_logits, ref))

    # all-linear: attention and every local expert's fc1/fc2; the router is left out
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        mlora.apply_lora_to_megatron_model([model], LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    record("report_text", buf.getvalue())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    record("only_lora_trainable", all(".lora_" in n for n in trainable))
    record("router_not_wrapped", not any("router" in n for n in trainable))
    record("local_expert_layers", sum(".local_experts." in n and ".lora_A." in n for n in trainable))
    record("expert_lora_allreduce", [getattr(p, "allreduce", None) for n, p in model.named_parameters()
                                     if ".local_experts.0.linear_fc1.lora_A" in n][0])
    try:
        mlora.apply_lora_to_megatron_model([build(hf, seed=4)], LoraConfig(r=4, target_modules=["router"]), log=False)
        record("router_target_error", "")
    except ValueError as err:
        record("router_target_error", str(err))
    with torch.no_grad():
        record("fresh_lora_is_noop", maxdiff(logits(model), base_logits))

    randomize_full_lora(model, layer_generator)
    with torch.no_grad():
        lora_logits = logits(model)
    record("lora_changes_logits", maxdiff(lora_logits, base_logits))
    saved = lora_tensors(model)

    # Megatron -> HF PEFT target_parameters layout; lorakit and peft on the HF model agree with Megatron
    adapter = OUT / "adapter"
    for what, value in export_checks(model, adapter, hf_model, IDS, lora_logits, RANK).items():
        record(f"export_{what}" if what != "config" else "export_config", value)
    dist.barrier()

    # the exported adapter back into a fresh Megatron model: same LoRA weights, same logits
    imported = build(hf, seed=7)
    imported.load_state_dict(base_sd, strict=False)
    mlora.import_hf_adapter([imported], adapter)
    got = lora_tensors(imported)
    record("import_equal", got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved))
    with torch.no_grad():
        record("import_logits", maxdiff(logits(imported), lora_logits))

    # an adapter made by peft itself (experts + o_proj; q/k/v would need one shared A) -> Megatron
    if RANK == 0:
        import peft

        torch.manual_seed(5)
        made = peft.get_peft_model(hf_model(), peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["o_proj"], use_rslora=True, init_lora_weights=False,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        with torch.no_grad():
            for n, p in made.named_parameters():
                if ".lora_" in n:
                    p.mul_(0.3)
            peft_logits = made(IDS).logits
        made.save_pretrained(str(OUT / "peft_made"))
        torch.save(peft_logits, OUT / "peft_made_logits.pt")
    dist.barrier()
    from_peft = build(hf, seed=8)
    from_peft.load_state_dict(base_sd, strict=False)
    mlora.import_hf_adapter([from_peft], OUT / "peft_made")
    with torch.no_grad():
        record("peft_made_vs_megatron", maxdiff(logits(from_peft), torch.load(OUT / "peft_made_logits.pt")))

    # per-rank checkpoint (one folder per EP rank), same-layout reload, offline export == online
    ckpt = OUT / "ckpt"
    mlora.save_megatron_lora([model], ckpt)
    fresh = build(hf, seed=5)
    fresh.load_state_dict(base_sd, strict=False)
    mlora.apply_lora_to_megatron_model([fresh], LoraConfig(r=8, alpha=16, target_modules="all-linear"), log=False)
    mlora.load_megatron_lora([fresh], ckpt)
    reloaded = lora_tensors(fresh)
    record("reload_exact", reloaded.keys() == saved.keys() and all(torch.equal(reloaded[k], saved[k]) for k in saved))
    if ARGS.other_layout:
        try:
            mlora.load_megatron_lora([fresh], ARGS.other_layout)
            record("other_ep_refused", "")
        except ValueError as err:
            record("other_ep_refused", str(err))
        record("other_ep_left_weights", all(torch.equal(v, lora_tensors(fresh)[k]) for k, v in reloaded.items()))
    if RANK == 0:
        from safetensors.torch import load_file

        mlora.export_hf_adapter_from_checkpoint(ckpt, OUT / "adapter_offline")
        on = load_file(str(adapter / "adapter_model.safetensors"))
        off = load_file(str(OUT / "adapter_offline" / "adapter_model.safetensors"))
        record("offline_export_equal", on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on))
    dist.barrier()

    # merge on the experts: same logits; unmerge restores
    merge_lora(model)
    with torch.no_grad():
        record("merge_logits", maxdiff(logits(model), lora_logits))
    unmerge_lora(model)
    grad_identity_check(model)
    train_check(model)


def grad_identity_check(model):
    """LoRA gradients against Megatron's own weight gradient of the same layer: for y = W x +
    s * B A x, dL/dB = s * G A^T and dL/dA = s * B^T G with G = dL/dW (full tensors, gathered).
    Exact whatever the dispatcher does with the tokens, so it checks the sharded LoRA backward."""
    from lorakit.lora.parallel import COLUMN

    infos = mlora.module_infos([model])
    for _, layer in infos:
        layer.base_layer.weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss(model).backward()
    worst = 0.0
    for info, layer in infos:
        column = layer.parallel_mode == COLUMN
        g_local = layer.base_layer.weight.grad
        parts = [torch.empty_like(g_local) for _ in range(layer.tp_world)]
        dist.all_gather(parts, g_local.contiguous(), group=layer.tp_group)
        g = unshard_tensor(parts, 0 if column else 1, layer.partition_stride if column else 1)
        a = layer.gather("lora_A", layer.lora_A["default"].weight.detach())
        b = layer.gather("lora_B", layer.lora_B["default"].weight.detach())
        s = layer.scaling["default"]
        for which, want in (("lora_A", s * b.T @ g), ("lora_B", s * g @ a.T)):
            got = layer.gather(which, getattr(layer, which)["default"].weight.grad)
            worst = max(worst, maxdiff(got, want) / max(want.abs().max().item(), 1e-12))
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer.weight.grad = None
    model.zero_grad(set_to_none=True)
    record("lora_grad_vs_weight_grad", worst)


def train_check(model):
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and torch.is_tensor(v)}
    before = lora_tensors(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        value = loss(model)
        value.backward()
        # data-parallel replicas (the dense LoRA on the EP ranks) average their gradients, as
        # Megatron's DDP would; expert LoRA is reduced over the expert-data-parallel group (size 1 here)
        for n, p in model.named_parameters():
            if p.requires_grad and getattr(p, "allreduce", True) and EP > 1:
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        opt.step()
        losses.append(value.item())
    record("train_losses", losses)
    after = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and torch.is_tensor(v)}
    record("train_base_unchanged", all(torch.equal(after[k], v) for k, v in base.items()))
    now = lora_tensors(model)
    record("train_every_expert_lora_changed", all(not torch.equal(now[k], before[k]) for k in before
                                                  if ".local_experts." in k and ".lora_B." in k))


def main():
    try:
        checks()
    except Exception:
        record("error", traceback.format_exc())
    (OUT / f"results_rank{RANK}.json").write_text(json.dumps(RESULTS, indent=1))
    dist.barrier()
    dist.destroy_process_group()


main()
