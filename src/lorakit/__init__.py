"""lorakit: exact, fast LoRA fine-tuning for large language models, in the PEFT adapter format."""

from .lora import (
    LoraConfig,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    route_adapters,
    save_adapter,
    set_active_adapters,
    trainable_report,
    unload_lora,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject_lora", "save_adapter", "load_adapter", "merge_lora", "unmerge_lora",
    "unload_lora", "set_active_adapters", "disable_adapters", "trainable_report",
    "route_adapters", "delete_adapter", "adapter_state_dict", "__version__",
]
