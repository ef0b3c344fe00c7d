import os

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_intra_op_thread():
    """One OpenMP thread for the test, restored after it: tiny tensors gain nothing from a second thread, and on
    the busy shared 2-core machine spinning threads made each step ~50x slower. Autouse in tests/engine, models and
    methods (their conftest.py); a module asks for it with `pytest.mark.usefixtures`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
