import pytest
import torch


@pytest.fixture
def ids() -> torch.Tensor:
    """A (3, 7) batch of token ids valid for every tiny model in tests/models.py."""
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
