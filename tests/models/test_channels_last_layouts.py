"""A channels_last training step never mixes memory layouts: an op that takes a dense NCHW tensor beside an NHWC
one runs a strided loop (tens of times slower) or copies."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastlt.engine import autocast, build_sgd, prepare_model
from fastlt.engine.loop import to_float32
from fastlt.models import create_model


def _layout(tensor):
    """'NHWC' / 'NCHW' for a 4-D tensor laid out one way only, None when both fit (C == 1 or H == W == 1)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        return None
    nhwc, nchw = tensor.is_contiguous(memory_format=torch.channels_last), tensor.is_contiguous()
    return None if nhwc == nchw else ("NHWC" if nhwc else "NCHW")


class MixedLayouts(TorchDispatchMode):
    """Counts the ops that take or give a dense NCHW tensor while another is NHWC (a strided slow loop, or a copy)."""

    def __init__(self):
        super().__init__()
        self.mixed = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        layouts = {_layout(t) for t in tree_flatten((args, kwargs, result))[0]} - {None}
        if len(layouts) > 1:
            self.mixed[str(func)] += 1
        return result


# (model, its options, precision, input channels and side): the CIFAR models on 32x32 RGB, the Fashion-MNIST-LT ones
# on 28x28 grey (odd 7x7 maps in the last stage)
CASES = [("ride_resnet32", {}, "fp32", 3, 32), ("ride_resnet32", {}, "bf16", 3, 32), ("resnet32", {}, "fp32", 3, 32),
         ("reslt_resnet32", {}, "fp32", 3, 32), ("ride_small_cnn", {}, "fp32", 1, 28),
         ("resnet8", {"in_channels": 1}, "fp32", 1, 28), ("ride_resnet8", {"in_channels": 1}, "bf16", 1, 28)]


@pytest.mark.parametrize("name, options, precision, channels, side", CASES)
def test_a_channels_last_step_never_mixes_layouts(name, options, precision, channels, side):
    """Before this check, the option-A shortcut's slice and the global pooling's mean handed NCHW gradients back
    into the NHWC backward: 19 mixed-layout ops in a RIDE ResNet-32 step, up to 6 ms each at batch 128."""
    torch.manual_seed(0)
    model = prepare_model(create_model(name, num_classes=10, **options).train(), torch.device("cpu"),
                          channels_last=True)
    optimizer = build_sgd(model, lr=0.1)
    images = torch.randn(4, channels, side, side)
    images = images.contiguous(memory_format=torch.channels_last)
    with MixedLayouts() as watch:
        with autocast("cpu", precision):
            output = to_float32(model(images))
        logits = output.expert_logits if output.expert_logits is not None else output.logits
        F.cross_entropy(logits.reshape(-1, 10), torch.arange(logits.numel() // 10) % 10).backward()
        optimizer.step()
    assert not watch.mixed, dict(watch.mixed)
