"""ctest: the CMake-built op library loads into torch and computes what the reference computes."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
logits = torch.randn(3, 4, 5)
expected = logits.mean(0)
actual = torch.ops.fastlt.expert_aggregate(logits, "mean", None, None)
torch.testing.assert_close(actual, expected)
weight = torch.randn(6, 7)
torch.testing.assert_close(torch.ops.fastlt.tau_normalize(weight, 1.0, 1e-12).norm(dim=1), torch.ones(6))
print("load_op_library: passed")
