"""The one crash-safe write helper: temp name, fsync, rename; a failure leaves the old state."""

import pytest
import torch

from lorakit.lora.atomic import atomic_directory, atomic_file
from lorakit.lora.tensors import full_tensor


def _leftovers(root):
    return [p.name for p in root.iterdir() if ".tmp-" in p.name]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("a")
            assert not target.exists()
            raise RuntimeError("crash mid-write")
    assert not target.exists() and _leftovers(tmp_path) == []
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_refuses_or_replaces_an_existing_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out: already exists"):
        with atomic_directory(target):
            pytest.fail("the block must not run")
    with pytest.raises(ValueError):
        with atomic_directory(target, replace=True) as staging:
            (staging / "new.txt").write_text("new")
            raise ValueError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # a failed replace keeps the old one
    with atomic_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_file_replaces_in_one_step_and_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "deep" / "f.json"
    assert atomic_file(target, lambda tmp: open(tmp, "w").write("one")) == target
    assert target.read_text() == "one"

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(target, broken)
    assert target.read_text() == "one" and _leftovers(target.parent) == []
    atomic_file(target, lambda tmp: open(tmp, "w").write("two"))
    assert target.read_text() == "two" and _leftovers(target.parent) == []


def test_full_tensor_returns_a_plain_tensor_itself():
    t = torch.arange(4.0)
    assert full_tensor(t) is t
