import os

import pytest
import torch

from sampling import SAMPLERS

# the samplers with orders (--solver_order): the solvers
SOLVERS = {name: step for name, step in SAMPLERS.items() if step.ORDERS}

# One thread in the processes the tests start (main.py runs) too, as one_thread below does in
# this one: with two, a 16-sample evaluation took 30 s instead of 1 on two busy cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use small tensors: two OpenMP threads on two (often shared) cores
    spin against each other and run 3-10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
