"""Fixtures shared by every test module. Tests run from the repository root on the CPU (see pytest.ini)."""
import pytest
import torch

from tests.helpers import TINY_KWARGS


@pytest.fixture
def tiny_kwargs():
    return dict(TINY_KWARGS)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
