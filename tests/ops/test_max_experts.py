"""The Python checks and the C++ / CUDA kernels agree on the most experts / branches an op takes."""

import pathlib
import re

from fastlt.ops import _checks

COMMON_H = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "include" / "fastlt" / "common.h"


def test_max_experts_is_the_kernels_kmaxexperts():
    match = re.search(r"constexpr\s+int\s+kMaxExperts\s*=\s*(\d+)\s*;", COMMON_H.read_text())
    assert match, f"no kMaxExperts in {COMMON_H}"
    assert _checks.MAX_EXPERTS == int(match.group(1))
