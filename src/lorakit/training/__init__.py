"""Shared training math and bookkeeping used by every recipe (loss, schedule, checkpoints, metrics)."""

from .checkpoint import check_same_run, latest_checkpoint, list_checkpoints, load_checkpoint_adapter, load_checkpoint_state, save_checkpoint
from .loss import causal_lm_loss, causal_lm_loss_by_group, packed_attention_is_isolated, token_logprobs
from .metrics import MetricsWriter, Progress, plot_loss, plot_metrics
from .optim import build_optimizer, param_groups, set_lr
from .schedule import lr_at, warmup_steps_for
from .setup import RunStart, start_run

__all__ = [
    "check_same_run", "latest_checkpoint", "list_checkpoints", "load_checkpoint_adapter", "load_checkpoint_state", "save_checkpoint", "causal_lm_loss", "causal_lm_loss_by_group", "packed_attention_is_isolated", "token_logprobs",
    "MetricsWriter", "Progress", "plot_loss", "plot_metrics", "lr_at", "warmup_steps_for", "RunStart", "start_run",
    "build_optimizer", "param_groups", "set_lr",
]
