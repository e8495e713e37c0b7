"""Fixtures shared by test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread is as fast, and far faster on a busy machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
