"""lorakit's LoRA core: imports only torch, safetensors and the standard library."""

from .config import LoraConfig
from .inject import inject_lora
from .state import (
    RowRouting,
    active_adapters,
    adapter_names,
    adapter_order,
    delete_adapter,
    disable_adapters,
    route_adapters,
    set_active_adapters,
)
from .trainable import TrainableReport, mark_trainable, set_adapter_trainable, trainable_report
from .tree import adapter_configs, lora_modules, unwrap_model
from .fingerprint import adapter_fingerprint, adapter_stamp
from .io import adapter_state_dict, final_adapter, initial_adapter, load_adapter, load_read_adapter, read_adapter, save_adapter, set_adapter_weights, write_adapter
from .experts import LoraParameter
from .layer import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .merge import iter_merged_weights, merge_lora, merged_weights, unload_lora, unmerge_lora

__all__ = [
    "LoraConfig", "inject_lora", "save_adapter", "load_adapter", "merge_lora", "unmerge_lora",
    "unload_lora", "merged_weights", "iter_merged_weights", "set_active_adapters", "disable_adapters", "trainable_report",
    "TrainableReport", "active_adapters", "adapter_configs", "adapter_names", "adapter_state_dict", "final_adapter", "initial_adapter",
    "adapter_fingerprint", "adapter_stamp", "load_read_adapter",
    "delete_adapter", "lora_modules", "mark_trainable", "read_adapter", "route_adapters", "adapter_order", "RowRouting", "set_adapter_trainable", "set_adapter_weights", "write_adapter",
    "unwrap_model", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraParameter", "ModulesToSave",
]
