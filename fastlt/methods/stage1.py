"""Stage-1 methods as loss wiring: each turns its options into `loss_fn(output, targets)` for `fastlt.engine.fit`, plus
an optional per-epoch hook (RIDE's and LDAM's DRW switch).

Each method lives in its own file (ce.py, ldam_drw.py, logit_adjust.py for Balanced Softmax, ride.py, reslt.py,
balpoe.py, sade.py) with the declaration of its options, registered with `fastlt.methods.registry.register_method`.
The losses themselves are fastlt's fused ops (`fastlt.RIDELoss`, `fastlt.ResLTLoss`, `fastlt.PriorShiftedCE`);
nothing here re-implements them.

>>> import torch
>>> from fastlt.models import create_model
>>> model = create_model("small_cnn", num_classes=10)
>>> method = build_method({"name": "ce"}, class_counts=[100] * 10, model=model)
>>> output = model(torch.zeros(4, 1, 28, 28))
>>> method.loss_fn(output, torch.zeros(4, dtype=torch.long)).shape
torch.Size([])
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fastlt.methods import registry
from fastlt.methods.options import Named, declared_fields, parse_named


@dataclass
class Method:
    """What the trainer needs from a method: the loss on a ModelOutput and a hook run at each 0-based epoch.
    needs_images: loss_fn(output, targets, images) (distillation runs its teacher on the batch)."""

    name: str
    loss_fn: Callable
    on_epoch_start: Optional[Callable[[int], None]] = None
    needs_images: bool = False


def stacked(output, field: str) -> torch.Tensor:
    """[E, B, C] logits of a multi-head output, or the single head's logits as a [1, B, C] view."""
    logits = getattr(output, field)
    return output.logits.unsqueeze(0) if logits is None else logits


def epoch_hook(loss_module: nn.Module) -> Callable[[int], None]:
    """The loss's DRW switch, told the engine's 0-based epoch (DRW from epoch drw_epoch: 160 is the official
    1-based 161)."""
    return loss_module.set_epoch


def method_options(method) -> Named:
    """The typed options of a `method:` section (a dict as a recipe writes it, or options already parsed)."""
    return parse_named(registry.declarations(1), method, "method", "method")


# What rebuilding a trained model in one process resets: no distillation teacher to load, the head held whole
REBUILD_RESETS = {"teacher": None, "head_parallel": "none"}


def rebuild_options(method) -> Named:
    """The method's options for rebuilding a trained model (its head adaptations) in one process, e.g. as a
    teacher or to evaluate it: without the teacher it was trained with, its fused head not class-parallel."""
    options = method_options(method)
    fields = declared_fields(type(options))
    return dataclasses.replace(options, **{key: value for key, value in REBUILD_RESETS.items() if key in fields})


def build_method(method, class_counts, model: nn.Module, device=None) -> Method:
    """The method a `method:` section names (see `fastlt methods`), its loss on `device`; may adapt `model` (LDAM's
    cosine classifier, RIDE's fused head)."""
    options = method_options(method)
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)
    return registry.get_method(options.name, stage=1).build(options, counts, model)
