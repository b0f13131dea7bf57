"""Megatron-core backend: tensor-parallel LoRA on a Megatron model, its checkpoints, and HF export.

megatron-core is an optional extra (``pip install 'lorakit[megatron]'``) imported lazily: this
module imports it only inside the functions that need it.

```python
from lorakit import LoraConfig
from lorakit.integrations.megatron import (apply_lora_to_megatron_model, save_megatron_lora,
                                           load_megatron_lora, export_hf_adapter)

model = get_model(model_provider)          # list of model chunks (virtual pipeline), before DDP
apply_lora_to_megatron_model(model, LoraConfig(r=16, alpha=32, target_modules=[
    "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
...                                        # train: only LoRA weights require grad
save_megatron_lora(model, "ckpt/lora")     # every TP/PP rank writes its shards
export_hf_adapter(model, "out/adapter")    # gathered, q/k/v and gate/up split: PEFT / vLLM format
```

The seeds' flags (``--use-lora --lora-r --lora-alpha --lora-dropout --lora-target-modules``) come
from :func:`add_lora_arguments`; ``apply_lora_to_megatron_model(model, args)`` accepts the parsed
args too, and :func:`custom_megatron_init` is the ``--custom-megatron-init-path`` hook.

Offline: ``python -m lorakit.integrations.megatron export CKPT_DIR OUT_DIR`` turns a checkpoint
written by :func:`save_megatron_lora` (any TP size) into an HF PEFT adapter without Megatron.

This module is the public face of the backend and its command line; the code lives one level
down, in ``megatron_model`` (layers, report, flags) and ``megatron_io`` (checkpoints, export,
import), which builds on ``megatron_model`` only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..lora.parallel import group_rank, group_size, shard_tensor
from .megatron_io import (
    BaseLoadReport,
    export_hf_adapter,
    export_hf_adapter_from_checkpoint,
    gather_lora,
    import_hf_adapter,
    load_base_checkpoint,
    load_megatron_lora,
    module_infos,
    save_megatron_lora,
)
from .megatron_model import (
    MegatronLoraLinear,
    MegatronLoraReport,
    NormedInputLoraLinear,
    add_lora_arguments,
    apply_lora_to_megatron_model,
    custom_megatron_init,
    lora_config_from_args,
    lora_model_provider,
    megatron_lora_report,
    model_chunks,
    parallel_spec,
)


# --- command line: offline export ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The offline export command's parser (also read by scripts/gen_reference.py for the manual)."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.integrations.megatron",
                                     description="Megatron-core LoRA checkpoints -> HF PEFT adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write an HF PEFT adapter from a save_megatron_lora checkpoint")
    export.add_argument("checkpoint", help="directory written by save_megatron_lora (holds lora_meta.json)")
    export.add_argument("output", help="adapter directory to write (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("--base-model", default=None, help="base_model_name_or_path to record in the config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_hf_adapter_from_checkpoint(args.checkpoint, args.output, args.base_model)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "apply_lora_to_megatron_model", "add_lora_arguments", "lora_config_from_args", "custom_megatron_init",
    "lora_model_provider", "megatron_lora_report", "MegatronLoraReport", "save_megatron_lora",
    "load_megatron_lora", "load_base_checkpoint", "BaseLoadReport", "export_hf_adapter",
    "export_hf_adapter_from_checkpoint", "import_hf_adapter", "gather_lora", "module_infos",
    "MegatronLoraLinear", "NormedInputLoraLinear", "parallel_spec", "model_chunks", "shard_tensor",
    "group_rank", "group_size",
]
