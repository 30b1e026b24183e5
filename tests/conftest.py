"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (bit-exact CPU comparisons), restoring the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
