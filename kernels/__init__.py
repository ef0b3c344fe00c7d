"""Triton kernels of the fastlt ops, installed as ``fastlt.kernels`` (one file per op, launcher beside kernel).

On a machine without a GPU they run on CPU tensors through Triton's interpreter: set ``TRITON_INTERPRET=1`` before
anything imports triton (the Makefile and tests/conftest.py do).
"""

import importlib.util

AVAILABLE = importlib.util.find_spec("triton") is not None
