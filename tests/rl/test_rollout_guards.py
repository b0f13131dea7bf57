"""How a rollout ended, and room for the vLLM hand-over: the guards between an engine and the trainer."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorakit.rl import trained_completions
from lorakit.rl.rollout import finish_reason
from lorakit.rl.vllm_rollout import check_room


def test_an_aborted_completion_is_kept_apart_from_a_length_cut_and_never_trained():
    # vLLM reports 'abort' for a request it gave up on; servers may say 'error'
    reasons = [finish_reason(r) for r in ("stop", "length", "abort", "error", None)]
    assert reasons == ["stop", "length", "abort", "abort", "length"]
    keep, truncated, aborted = trained_completions(reasons, mask_truncated=False)
    assert truncated.tolist() == [False, True, False, False, True]
    assert aborted.tolist() == [False, False, True, True, False]
    assert keep.tolist() == [True, True, False, False, True]
    keep, _, _ = trained_completions(reasons, mask_truncated=True)
    assert keep.tolist() == [True, False, False, False, False]
    assert keep.dtype == torch.bool


def test_a_hand_over_directory_without_room_is_a_located_error(tmp_path):
    target = tmp_path / "lorakit-rollout-1" / "sub"
    free = shutil.disk_usage(tmp_path).free
    check_room(target, 1 << 20)  # fits: no error (the directory need not exist yet)
    with pytest.raises(OSError, match=rf"{target}: the policy adapter hand-over to vLLM needs .* MiB but {tmp_path} has"
                                      r" .* MiB free; give /dev/shm more room"):
        check_room(target, free + (1 << 30))
