"""Parameters sharded by class across the ranks of a process group (class-parallel heads, docs/methods.md 8.6):
which classes a rank holds, the whole tensor gathered for a checkpoint, and a rank's shard taken from a whole one.

A class-parallel module (``fastlt.LinearRIDELoss(process_group=...)``) marks each sharded parameter with a
:class:`ClassShard`. Checkpoints then hold whole tensors whatever the world size: the module's state dict gathers
its shards, :func:`gather_optimizer_state` the optimizer's per-parameter state (momentum buffers) of marked
parameters, and loading takes each rank's shard of them (:meth:`ClassShard.take`, :func:`shard_optimizer_state`),
so a run saved on W ranks resumes on any number of ranks, one process included. fastlt.engine's checkpoints call
these; fastlt.engine.wrap_model leaves marked parameters (and their module's buffers) out of DistributedDataParallel
(:func:`names_outside_ddp`).

>>> shard = ClassShard(group=None, num_classes=10, start=4, stop=7, dim=1)
>>> shard.take(torch.arange(20).view(2, 10)).tolist()
[[4, 5, 6], [14, 15, 16]]
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from fastlt.ops._class_parallel import class_shard, group_shard


@dataclass(frozen=True)
class ClassShard:
    """A tensor's classes ``[start, stop)`` of ``num_classes`` along dim ``dim``, held by this rank of ``group``
    (contiguous shards in rank order: fastlt.ops.class_shard)."""

    group: object
    num_classes: int
    start: int
    stop: int
    dim: int

    @classmethod
    def of_group(cls, op: str, group, num_classes: int, dim: int) -> "ClassShard":
        return cls(group, num_classes, *group_shard(op, group, num_classes), dim)

    def holds_all(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` has all ``num_classes`` classes along the shard's dim (a whole, gathered tensor)."""
        return tensor.dim() > self.dim and tensor.shape[self.dim] == self.num_classes

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's classes of a whole tensor."""
        return whole.narrow(self.dim, self.start, self.stop - self.start)

    def gather(self, shard: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole tensor from every rank's shard (classes along the shard's dim), on the group's first rank
        (None on the others, which send); a collective: every rank of the group calls it."""
        padded = self._padded(shard.detach(), self.dim)
        is_first = dist.get_rank(self.group) == 0
        # one buffer for all shards: with C a multiple of W it is the whole tensor, no copy after the gather
        buffer = padded.new_empty(self._world_size(), *padded.shape) if is_first else None
        dist.gather(padded, list(buffer.unbind()) if is_first else None, dst=dist.get_global_rank(self._group(), 0),
                    group=self.group)
        return self._unpadded(buffer, self.dim) if is_first else None

    def all_gather(self, shard: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole tensor on every rank, from every rank's shard with the classes along ``dim`` (inference: the
        logits of rows every rank holds)."""
        padded = self._padded(shard, dim)
        gathered = funcol.all_gather_single(padded, 0, self.group)
        return self._unpadded(gathered.view(self._world_size(), *padded.shape), dim)

    def topk(self, logits: torch.Tensor, k: int) -> tuple:
        """(values, classes) [B, k] of the k largest of the whole rows whose shard ``logits`` [B, n] this rank
        holds: every rank's top k (padded with -inf) all-gathered, W x B x k candidates, then their top k."""
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"topk: k must be in [1, {self.num_classes}], got {k}")
        values, classes = logits.topk(min(k, logits.shape[-1]), dim=-1)
        missing = k - values.shape[-1]
        values = torch.cat([values, values.new_full((*values.shape[:-1], missing), float("-inf"))], -1)
        classes = torch.cat([classes + self.start, classes.new_full((*classes.shape[:-1], missing), -1)], -1)
        all_values = torch.cat(funcol.all_gather_single(values.contiguous()[None], 0, self.group).unbind(), -1)
        all_classes = torch.cat(funcol.all_gather_single(classes.contiguous()[None], 0, self.group).unbind(), -1)
        best_values, best = all_values.topk(k, dim=-1)
        return best_values, all_classes.gather(-1, best)

    def _group(self):
        return self.group if self.group is not None else dist.group.WORLD

    def _world_size(self) -> int:
        return dist.get_world_size(self.group)

    def _padded(self, shard: torch.Tensor, dim: int) -> torch.Tensor:
        """The shard with its classes moved to dim 0, padded to the largest shard (collectives need equal sizes)."""
        largest = -(-self.num_classes // self._world_size())
        moved = shard.movedim(dim, 0)
        return torch.cat([moved, moved.new_zeros(largest - moved.shape[0], *moved.shape[1:])]).contiguous()

    def _unpadded(self, stacked: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole tensor from every rank's padded shard, stacked [W, largest shard, ...] in rank order, the
        classes moved back to ``dim`` (a view when the shards are equal: no padding)."""
        world_size = self._world_size()
        sizes = [stop - start for start, stop in (class_shard(self.num_classes, world_size, rank)
                                                  for rank in range(world_size))]
        whole = (stacked.flatten(0, 1) if min(sizes) == stacked.shape[1]
                 else torch.cat([part[:size] for part, size in zip(stacked, sizes)]))
        return whole.movedim(0, dim)


def mark(parameter: nn.Parameter, shard: ClassShard) -> nn.Parameter:
    """Mark ``parameter`` as this rank's ``shard`` of a class-parallel tensor."""
    parameter.class_shard = shard
    return parameter


def class_shard_of(tensor) -> Optional[ClassShard]:
    return getattr(tensor, "class_shard", None)


def sharded_parameter_names(module: nn.Module) -> list:
    """The names of ``module``'s class-sharded parameters."""
    return [name for name, parameter in module.named_parameters() if class_shard_of(parameter) is not None]


def names_outside_ddp(module: nn.Module) -> list:
    """What DistributedDataParallel must leave out of ``module``: its class-sharded parameters (each rank's hold
    other classes, and their gradients are complete without an all-reduce) and the buffers of the submodules that
    hold them (a class-parallel head's per-class tables, the same on every rank: no broadcast each step)."""
    names = []
    for prefix, submodule in module.named_modules():
        own = dict(submodule.named_parameters(recurse=False))
        if any(class_shard_of(parameter) is not None for parameter in own.values()):
            names += [f"{prefix}.{name}" if prefix else name for name in own]
            names += [f"{prefix}.{name}" if prefix else name for name, _ in submodule.named_buffers(recurse=False)]
    return names


def has_class_shards(module: nn.Module) -> bool:
    return bool(sharded_parameter_names(module))


def _with_sharded_states(optimizer: torch.optim.Optimizer, state_dict: dict, convert) -> dict:
    """``state_dict`` with each marked parameter's state replaced by a copy whose tensors ``convert(tensor,
    shard, parameter)`` maps (the live optimizer's state, which ``optimizer.state_dict()`` shares, is left alone). A
    state dict numbers the parameters in the order of the optimizer's param_groups."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    states = dict(state_dict["state"])
    for index, parameter in enumerate(parameters):
        shard = class_shard_of(parameter)
        if shard is not None and index in states:
            states[index] = {key: convert(value, shard, parameter) if isinstance(value, torch.Tensor) else value
                             for key, value in states[index].items()}
    return dict(state_dict, state=states)


def gather_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """``optimizer.state_dict()`` with each marked parameter's state tensors of the parameter's shape (SGD's momentum,
    Adam's moments) gathered whole on the group's first rank (a collective over each group; the other ranks' copy
    holds None there)."""
    return _with_sharded_states(optimizer, state_dict, lambda value, shard, parameter: (
        shard.gather(value) if value.shape == parameter.shape else value))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A state dict saved whole (:func:`gather_optimizer_state`, or by one process) with each marked parameter's
    whole state tensors cut to this rank's shard, for ``optimizer.load_state_dict``."""
    return _with_sharded_states(optimizer, state_dict, lambda value, shard, parameter: (
        shard.take(value).clone() if shard.holds_all(value) and value.dim() == parameter.dim() else value))


def register_state_dict_hooks(module: nn.Module, names) -> None:
    """The parameters ``names`` of ``module`` (marked) appear whole in its state dict, gathered on the group's first
    rank (the other ranks keep their shards there), and a state dict loads from a whole tensor or this rank's shard.
    ``module.state_dict()`` is then a collective: every rank calls it."""

    def gather_whole(module, state_dict, prefix, local_metadata):
        for name in names:
            parameter = getattr(module, name)
            whole = class_shard_of(parameter).gather(parameter)
            if whole is not None:
                state_dict[prefix + name] = whole

    def take_shard(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in names:
            key, shard = prefix + name, class_shard_of(getattr(module, name))
            if key in state_dict and shard.holds_all(state_dict[key]):
                state_dict[key] = shard.take(state_dict[key])

    module.register_state_dict_post_hook(gather_whole)
    module.register_load_state_dict_pre_hook(take_shard)
