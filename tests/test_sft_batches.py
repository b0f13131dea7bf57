"""SFT's per-rank micro-batches: strided shares, and a label-free stand-in for a rank with none."""

from lorakit.data import IGNORE, Row
from lorakit.distributed import DistInfo
from lorakit.recipes.sft import rank_micro_batch

ROWS = [Row([5, 6, 7], [IGNORE, 6, 7], [0, 1, 2]), Row([8, 9], [IGNORE, 9], [0, 1]), Row([4], [IGNORE], [0])]


def test_each_rank_takes_every_world_th_row():
    zero = rank_micro_batch(ROWS, DistInfo(rank=0, world=2), pad_id=0, packed=False, padding_free=False)
    assert zero["input_ids"].tolist() == [[5, 6, 7], [4, 0, 0]]
    assert zero["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert zero["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    one = rank_micro_batch(ROWS, DistInfo(rank=1, world=2), pad_id=0, packed=False, padding_free=True)
    assert one["input_ids"].tolist() == [[8, 9]] and one["labels"].tolist() == [[IGNORE, 9]]


def test_a_rank_with_no_row_gets_one_without_labels():
    got = rank_micro_batch(ROWS[:1], DistInfo(rank=1, world=2), pad_id=0, packed=False, padding_free=False)
    assert got["input_ids"].tolist() == [[5, 6, 7]]
    assert got["labels"].tolist() == [[IGNORE, IGNORE, IGNORE]]  # no loss, but the forward runs
    assert int(got["num_tokens"]) == 3
