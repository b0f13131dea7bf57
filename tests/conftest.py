import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def lorakit_cache(tmp_path_factory):
    """`model: demo` builds into this session's own cache (and so do the CLI subprocesses, which
    inherit the environment): tests never write to, or race on, the user's ~/.cache/lorakit."""
    path = tmp_path_factory.mktemp("lorakit-cache")
    os.environ["LORAKIT_CACHE"] = str(path)
    return path


@pytest.fixture
def ids() -> torch.Tensor:
    """A (3, 7) batch of token ids valid for every tiny model in tests/models.py."""
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
