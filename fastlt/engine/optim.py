"""SGD as the three papers use it (momentum 0.9, optional Nesterov, weight decay on every parameter), run by torch's
fused or multi-tensor (foreach) implementation."""

from typing import Iterable, Union

import torch
from torch import nn

IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def build_sgd(
    parameters: Union[nn.Module, Iterable],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    implementation: str = "auto",
) -> torch.optim.SGD:
    """SGD over a module's trainable parameters, or over explicit parameter groups.

    implementation: "auto" (fused kernels, else foreach), "fused", "foreach" or "for_loop". All three give the
    same update; fused is one kernel per step on CPU and CUDA.
    Frozen parameters (requires_grad False, e.g. a stage-2 backbone) are left out.

    >>> optimizer = build_sgd(nn.Linear(4, 2), lr=0.1, weight_decay=5e-4, nesterov=True)
    >>> optimizer.param_groups[0]["nesterov"]
    True
    >>> groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 0.01}]  # e.g. Places-LT backbone vs classifier
    >>> build_sgd(groups, lr=0.1).param_groups[0]["lr"]
    0.01
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"build_sgd: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if isinstance(parameters, nn.Module):
        parameters = [parameter for parameter in parameters.parameters() if parameter.requires_grad]
    parameters = [dict(item, params=list(item["params"])) if isinstance(item, dict) else item for item in parameters]
    if not parameters:
        raise ValueError("build_sgd: no trainable parameters")
    options = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if implementation == "auto":
        implementation = "fused" if _fused_supported(parameters) else "foreach"
    if implementation == "fused":
        options["fused"] = True
    else:
        options["foreach"] = implementation == "foreach"
    return torch.optim.SGD(parameters, **options)


def _fused_supported(parameters: list) -> bool:
    """torch's fused SGD handles floating-point parameters on CPU and CUDA (and a few other accelerators)."""
    tensors = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
