"""The step's speed options: where channels_last is the default, and the bf16 recommendation (and its `fastlt
doctor` line)."""

import sys

import pytest
import torch

from fastlt.engine import amp, channels_last_is_faster


def test_channels_last_is_the_default_on_cuda_and_on_onednn_cpus(monkeypatch):
    assert channels_last_is_faster("cuda")
    assert not channels_last_is_faster("meta")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert channels_last_is_faster(torch.device("cpu"))
    with torch.backends.mkldnn.flags(enabled=False):  # torch told not to use oneDNN
        assert not channels_last_is_faster("cpu")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
    assert not channels_last_is_faster("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's /proc/cpuinfo flags")
def test_bf16_instructions_match_the_cpu_flags():
    with open("/proc/cpuinfo") as handle:
        flags = set(next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split())
    assert amp.cpu_has_bf16_instructions() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("has_bf16, recommended", [(True, "train.precision=bf16 is recommended"),
                                                   (False, "keep train.precision=fp32")])
def test_doctor_says_whether_bf16_is_recommended(monkeypatch, has_bf16, recommended):
    from fastlt import doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(amp, "cpu_has_bf16_instructions", lambda: has_bf16)
    lines = [line for line in doctor.environment_lines() if line.startswith("bf16")]
    assert len(lines) == 1 and recommended in lines[0]
