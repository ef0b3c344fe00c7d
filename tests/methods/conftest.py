import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny models: a second OpenMP thread buys nothing and spins on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DIGITS = ["data.name=digits_lt", "data.n_max=150", "data.ratio=10", "data.num_workers=0", "data.loader=torch"]
