import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny tensors gain nothing from a second OpenMP thread, and spinning threads on the busy shared 2-core
    machine made each forward pass many times slower. Restored after every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
