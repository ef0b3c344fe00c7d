import pytest


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_intra_op_thread):
    """Every test here runs tiny tensors (tests/conftest.py's one_intra_op_thread)."""


DIGITS = ["data.name=digits_lt", "data.n_max=150", "data.ratio=10", "data.num_workers=0", "data.loader=torch"]
