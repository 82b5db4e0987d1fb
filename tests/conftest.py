"""Fixtures shared by every test module. Tests run from the repository root on the CPU (see pytest.ini); shared
helpers are plain modules: tests/helpers.py (the tiny model, paths) and tests/reference.py (brute-force ops)."""
import pytest
import torch

from tests.helpers import TINY_KWARGS


@pytest.fixture
def tiny_kwargs():
    """A fresh copy of the tiny model's constructor arguments."""
    return dict(TINY_KWARGS)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
