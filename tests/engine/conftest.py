import os
import sys

import pytest

# helper modules beside the tests (toy data, the DDP worker script) import by bare name in any pytest import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_intra_op_thread):
    """Every test here runs tiny tensors (tests/conftest.py's one_intra_op_thread)."""
