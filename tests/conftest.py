import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use small tensors: two OpenMP threads on two (often shared) cores
    spin against each other and run 3-10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
