"""FSDP2's sharded load reads MoE experts that the checkpoint holds one by one (the hub layout
transformers converts while loading) straight into the model's fused (experts, rows, cols)
parameters. Oracle: the parameters of the model transformers itself loads from the same directory."""

import pytest
import torch
from safetensors.torch import load_file

from lorakit.distributed.sharded_load import build_meta_model, checkpoint_index, mismatched_keys, read_rows

from .models import MOE_FAMILIES, tiny_moe


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_parameter_is_found_and_reads_back_equal(tmp_path, family):
    from transformers import AutoModelForCausalLM

    tiny_moe(family).save_pretrained(tmp_path)
    index = checkpoint_index(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    meta = build_meta_model(str(tmp_path), torch.float32)
    assert mismatched_keys(meta, index) == []  # nothing falls back to a whole load on every rank
    for name, param in loaded.named_parameters():
        if ".experts." not in name or param.dim() != 3:
            continue
        key = name if name in index.entries else f"model.{name}"
        experts = param.shape[0]
        whole = torch.empty_like(param)
        read_rows(index.entries[key], slice(0, experts), whole)
        assert torch.equal(whole, param.detach()), name
        last = torch.empty_like(param[experts // 2:])  # a rank's shard: its experts only
        nbytes = read_rows(index.entries[key], slice(experts // 2, experts), last)
        assert torch.equal(last, param.detach()[experts // 2:]) and nbytes == last.numel() * 4, name
    # the checkpoint's size counts each stored tensor once (the fused names are views of them)
    stored = load_file(tmp_path / "model.safetensors")
    assert index.nbytes == sum(t.numel() * t.element_size() for t in stored.values())
