import os
import sys

import pytest
import torch

# helper modules beside the tests (toy data, the DDP worker script) import by bare name in any pytest import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These tests run tiny tensors, where a second OpenMP thread buys nothing; when the shared 2-core machine is
    busy, spinning OpenMP threads made each step ~50x slower. Restored after every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
