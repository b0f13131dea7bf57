"""Shared training math and bookkeeping used by every recipe (loss, schedule, checkpoints, metrics)."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_adapter, load_checkpoint_state, save_checkpoint
from .loss import causal_lm_loss, packed_attention_is_isolated
from .metrics import MetricsWriter, Progress, plot_loss
from .schedule import lr_at, warmup_steps_for

__all__ = [
    "latest_checkpoint", "list_checkpoints", "load_checkpoint_adapter", "load_checkpoint_state", "save_checkpoint", "causal_lm_loss", "packed_attention_is_isolated",
    "MetricsWriter", "Progress", "plot_loss", "lr_at", "warmup_steps_for",
]
