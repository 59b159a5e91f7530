"""Test-session settings shared by every test file."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_cpu_thread():
    """The suite works on small tensors, where torch's intra-op threads only add synchronisation
    (measured on 2 idle cores: the check registry runs in 22 s with one thread and 79 s with two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
