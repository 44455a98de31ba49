"""The evaluation tests time real passes: one torch thread keeps them fast on a busy 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads can be 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
