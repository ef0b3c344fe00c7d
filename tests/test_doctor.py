"""fastlt doctor and the first-use self-check of compiled kernels (fastlt.ops._selfcheck)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from op_helpers import needs_cpp

import fastlt
from fastlt import doctor
from fastlt.ops import _selfcheck


@pytest.fixture
def wrong_cpp_expert_aggregate(monkeypatch):
    """The compiled expert_aggregate made wrong on purpose: 1% too large (its gradient too, through autograd)."""
    correct = torch.ops.fastlt.expert_aggregate.default
    monkeypatch.setattr(torch.ops.fastlt.expert_aggregate, "default", lambda *args: correct(*args) * 1.01)


@needs_cpp
def test_doctor_fails_naming_the_wrong_kernel(wrong_cpp_expert_aggregate, capsys):
    code = doctor.main(["--ops", "expert_aggregate", "tau_normalize"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: expert_aggregate disagree" in out
    assert "expert_aggregate (cpu cpp float32: wrong values and gradients)" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("expert_aggregate ", "tau_normalize "))]
    results = {(row[0], row[2], row[3]): row[6] for row in table}
    assert results[("expert_aggregate", "cpp", "float32")] == "MISMATCH"
    assert results[("expert_aggregate", "triton", "float32")] == "ok"
    assert results[("tau_normalize", "cpp", "bfloat16")] == "ok"


@needs_cpp
def test_doctor_passes_through_the_fastlt_command(capsys):
    from fastlt import cli

    assert cli.main(["doctor", "--ops", "tau_sweep"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out
    assert "CPU ISA clones avx512f, avx2, default" in out
    assert "all 4 checks agree with the reference" in out  # cpp and triton, fp32 and bf16


def test_doctor_fails_when_it_checked_nothing_and_says_why(monkeypatch, capsys):
    """A pure-Python install without Triton, or an extension refused over a torch mismatch: no kernel is checked,
    which is a failure, not "all 0 checks agree"."""
    from fastlt import _extension, kernels

    mismatch = "fastlt._C was compiled against torch 2.0.0, but torch 2.14.1 is running"
    monkeypatch.setattr(_extension, "AVAILABLE", False)
    monkeypatch.setattr(_extension, "IMPORT_ERROR", mismatch)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor.main(["--ops", "tau_sweep"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: no kernel was checked" in out
    assert mismatch in out and "triton not installed" in out
    assert "all 0 checks" not in out


def test_check_op_reports_a_kernel_that_raises(monkeypatch):
    def broken(*args):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(torch.ops.fastlt.tau_normalize, "triton", broken)
    (row,) = _selfcheck.check_op("fastlt.tau_normalize", "cpu", "triton", dtypes=(torch.float32,), tiny=True)
    assert row["ok"] is False and row["op"] == "tau_normalize"
    assert row["note"] == "raised RuntimeError: illegal memory access"


@pytest.fixture
def selfcheck_on_cpu(monkeypatch):
    """The self-check applied to the CPU kernels (it normally guards the CUDA ones), with no verdicts yet."""
    monkeypatch.setattr(_selfcheck, "SELFCHECK", True)
    monkeypatch.setattr(_selfcheck, "SELFCHECK_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(_selfcheck, "_verdicts", {})


@needs_cpp
def test_selfcheck_falls_back_from_a_wrong_kernel_and_warns_once(selfcheck_on_cpu, wrong_cpp_expert_aggregate):
    logits = torch.randn(3, 4, 10, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="compiled cpu kernel of fastlt.expert_aggregate disagrees"):
        out = fastlt.ops.expert_aggregate(logits)
    torch.testing.assert_close(out, logits.mean(0))  # the reference's answer, not the wrong kernel's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fastlt.ops.expert_aggregate(logits), logits.mean(0))  # no second warning
        weight = torch.randn(6, 5)
        fastlt.ops.tau_normalize(weight, 1.0)  # a correct kernel passes its check silently
    assert _selfcheck._verdicts == {("fastlt.expert_aggregate", "cpu"): "reference",
                                    ("fastlt.tau_normalize", "cpu"): None}


@needs_cpp
def test_selfcheck_off_runs_the_kernel_unchecked(selfcheck_on_cpu, wrong_cpp_expert_aggregate, monkeypatch):
    monkeypatch.setattr(_selfcheck, "SELFCHECK", False)
    logits = torch.randn(3, 4, 10)
    torch.testing.assert_close(fastlt.ops.expert_aggregate(logits), logits.mean(0) * 1.01)
    assert _selfcheck._verdicts == {}


def test_selfcheck_opt_out_environment_variable():
    assert _selfcheck.SELFCHECK is (os.environ.get("FASTLT_SELFCHECK", "1") != "0")  # on by default
    code = "import fastlt.ops._selfcheck as s; print(s.SELFCHECK, s.SELFCHECK_DEVICE_TYPES)"
    env = dict(os.environ, FASTLT_SELFCHECK="0")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False ('cuda',)"
