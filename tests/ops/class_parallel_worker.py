"""Run by test_class_parallel.py under torchrun (gloo, CPU): the class-parallel fused heads on W ranks. Each rank
writes what it computed (losses, its shard of the weight gradients, its rows' feature gradients, logits, a
checkpoint's shards) to <out>/rank<r>.pt; the test compares them with one process on the whole batch and the
concatenated classifier.

    torchrun --nproc_per_node W class_parallel_worker.py <out> [<checkpoint to save> | --resume <checkpoint>]
"""

import sys

import torch
import torch.distributed as dist

import fastlt
from fastlt.engine import load_checkpoint, save_checkpoint
from fastlt.ops import class_shard

NUM_CLASSES = 11  # a multiple of neither 2 nor 3
LOCAL_ROWS = 3
DIM = 5
# name -> (head, options): every head, cosine and linear, with bias, shared features, ignored rows, both reductions
CASES = {
    "ride_cosine_drw_diversity": ("ride", dict(experts=3, normalize=True, drw=True, diversity_factor=-0.45)),
    "ride_linear_bias_shared_sum": ("ride", dict(experts=2, normalize=False, bias=True, shared=True,
                                                 diversity_factor=0.3, reduction="sum")),
    "ride_targets_in_the_first_shard": ("ride", dict(experts=2, normalize=True, drw=True, diversity_factor=-0.45,
                                                     targets_below=2)),
    "ride_fp32": ("ride", dict(experts=3, normalize=True, drw=True, diversity_factor=-0.45, dtype=torch.float32)),
    "ride_batch_given_whole": ("ride", dict(experts=2, normalize=True, drw=True, diversity_factor=-0.45,
                                            gather_batch=False)),
    "prior_shifted_ce_taus": ("prior", dict(experts=3, normalize=True, bias=True, taus=[0.0, 1.0, 2.0])),
    "reslt_linear_bias": ("reslt", dict(experts=3, normalize=False, bias=True, beta=0.9)),
    "reslt_cosine_sum": ("reslt", dict(experts=2, normalize=True, beta=0.5, reduction="sum")),
}
BACKEND_CASES = {"triton": ["ride_cosine_drw_diversity"],
                 "reference": ["ride_cosine_drw_diversity", "reslt_linear_bias"]}


def case_inputs(name, world_size):
    """(whole features [E, W*B, D] or [W*B, D], whole weight [E, C, D] ([C, D] for ResLT), whole bias or None,
    whole target [W*B] with ignored rows, class counts [C], group masks [K, C] or None) of a case, the same in every
    process."""
    head, options = CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)) + world_size)
    experts, rows, dtype = options["experts"], world_size * LOCAL_ROWS, options.get("dtype", torch.float64)
    features = torch.randn((rows, DIM) if options.get("shared") else (experts, rows, DIM), generator=generator)
    weight = torch.randn((NUM_CLASSES, DIM) if head == "reslt" else (experts, NUM_CLASSES, DIM), generator=generator)
    bias = torch.randn(weight.shape[:-1], generator=generator) if options.get("bias") else None
    target = torch.randint(0, options.get("targets_below", NUM_CLASSES), (rows,), generator=generator)
    target[1] = target[-1] = -100  # ignored rows, on the first and the last rank
    counts = (100 * torch.exp(-torch.arange(NUM_CLASSES) / NUM_CLASSES * 6)).floor().clamp_min(1)
    groups = None
    if head == "reslt":
        groups = fastlt.ops.reslt_groups(counts, cutoffs=[3, 7][:experts - 1], num_branches=experts)
    features, weight, bias = (None if t is None else t.to(dtype) for t in (features, weight, bias))
    return features, weight, bias, target, counts, groups


def head_loss(name, features, weight, bias, target, counts, groups, **parallel):
    """The case's loss (one process: no ``parallel`` options)."""
    head, options = CASES[name]
    common = dict(normalize=options["normalize"], bias=bias, chunk_size=3, reduction=options.get("reduction", "mean"),
                  **parallel)
    if head == "ride":
        return fastlt.ops.linear_ride_loss(features, weight, target, counts, drw=options.get("drw", False),
                                           diversity_factor=options["diversity_factor"], **common)
    if head == "prior":
        return fastlt.ops.linear_prior_shifted_ce(features, weight, target, counts, taus=options["taus"], **common)
    return fastlt.ops.linear_reslt_loss(features, weight, target, groups, beta=options["beta"],
                                        scale=16.0 if options["normalize"] else 1.0, **common)


def sharded_inputs(name, rank, world_size):
    """This rank's part of a case: its rows (or the whole batch, for gather_batch=False) and its classes."""
    head, options = CASES[name]
    features, weight, bias, target, counts, groups = case_inputs(name, world_size)
    start, stop = class_shard(NUM_CLASSES, world_size, rank)
    class_dim = 0 if head == "reslt" else 1
    weight = weight.narrow(class_dim, start, stop - start)
    bias = None if bias is None else bias.narrow(class_dim, start, stop - start)
    if options.get("gather_batch", True):
        rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS)
        features, target = features[..., rows, :], target[rows]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (features, weight, bias)]
    return leaves, target, counts, groups


def run_cases(rank, world_size, group):
    results = {}
    for backend, names in [("auto", list(CASES)), *BACKEND_CASES.items()]:
        with fastlt.ops.use_backend(backend):
            for name in names:
                (features, weight, bias), target, counts, groups = sharded_inputs(name, rank, world_size)
                loss = head_loss(name, features, weight, bias, target, counts, groups, process_group=group,
                                 gather_batch=CASES[name][1].get("gather_batch", True))
                loss.backward()
                results[(name, backend)] = dict(loss=loss.detach(), features=features.grad, weight=weight.grad,
                                                bias=None if bias is None else bias.grad)
    return results


def ddp_trunk_step(rank, world_size, group):
    """One step of a linear trunk under DDP feeding a class-parallel LinearRIDELoss (ddp_trunk=True): the trunk's
    averaged gradient and the head's shard gradient."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3 * DIM).double()
    images = torch.randn(world_size * LOCAL_ROWS, 4, dtype=torch.float64)
    target = torch.randint(0, NUM_CLASSES, (world_size * LOCAL_ROWS,))
    counts = torch.arange(NUM_CLASSES, 0, -1).double() * 10
    head = fastlt.LinearRIDELoss(counts, 3, DIM, chunk_size=4, drw_epoch=0, process_group=group, ddp_trunk=True)
    head = head.double()
    start, stop = class_shard(NUM_CLASSES, world_size, rank)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64)[:, start:stop])
    ddp = torch.nn.parallel.DistributedDataParallel(trunk)
    rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS)
    features = ddp(images[rows]).view(LOCAL_ROWS, 3, DIM).transpose(0, 1)
    loss = head(features, target[rows])
    loss.backward()
    return dict(loss=loss.detach(), trunk={name: p.grad for name, p in trunk.named_parameters()},
                head_weight=head.weight.grad, logits=head.logits(torch.randn(3, 4, DIM, dtype=torch.float64,
                                                                             generator=torch.Generator().manual_seed(2))),
                topk=head.topk(torch.randn(3, 4, DIM, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(2)), 4))


SAVED_ON_RANKS = 2  # the checkpoint's world size


def checkpoint_model(group, momentum_step: bool):
    """A LinearRIDELoss (linear: weight and bias sharded) and an SGD with momentum; with ``momentum_step``, one step
    on the batch of SAVED_ON_RANKS ranks (this rank's rows of it), so the checkpoint holds momentum buffers."""
    torch.manual_seed(3)
    counts = torch.arange(NUM_CLASSES, 0, -1).double() * 10
    head = fastlt.LinearRIDELoss(counts, 2, DIM, normalize=False, chunk_size=4, process_group=group).double()
    world_size, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    start, stop = class_shard(NUM_CLASSES, world_size, rank)
    generator = torch.Generator().manual_seed(4)
    whole_weight = torch.randn(2, NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    whole_bias = torch.randn(2, NUM_CLASSES, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(whole_weight[:, start:stop])
        head.bias.copy_(whole_bias[:, start:stop])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    if momentum_step:
        rows = torch.randn(SAVED_ON_RANKS * 2, DIM, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, NUM_CLASSES, (SAVED_ON_RANKS * 2,), generator=generator)
        mine = slice(None) if group is None else slice(rank * 2, (rank + 1) * 2)
        head(rows[mine], labels[mine]).backward()
        optimizer.step()
    return head, optimizer


def refusals(rank, group):
    """The error every rank raises when one rank's arguments are refused (the others must not wait forever)."""
    messages = []
    (features, weight, bias), target, counts, groups = sharded_inputs("ride_cosine_drw_diversity", rank,
                                                                      dist.get_world_size(group))
    one_row_less = dict(features=features[..., :2, :], target=target[:2])
    for change in (dict(target=target + 100) if rank == 1 else {}, one_row_less if rank == 0 else {}):
        arguments = dict(features=features, weight=weight, target=target, class_counts=counts, process_group=group)
        try:
            fastlt.ops.linear_ride_loss(**dict(arguments, **change))
        except ValueError as error:
            messages.append(str(error))
    return messages


def compiled_case(rank, world_size, group):
    """The class-parallel RIDE loss under torch.compile(fullgraph=True)."""
    (features, weight, bias), target, counts, groups = sharded_inputs("ride_cosine_drw_diversity", rank, world_size)
    compiled = torch.compile(lambda x, w: head_loss("ride_cosine_drw_diversity", x, w, None, target, counts, None,
                                                    process_group=group), fullgraph=True)
    loss = compiled(features, weight)
    loss.backward()
    return dict(loss=loss.detach(), features=features.grad, weight=weight.grad)


def main(out, mode, checkpoint):
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {"cases": run_cases(rank, world_size, group), "ddp": ddp_trunk_step(rank, world_size, group),
              "refusals": refusals(rank, group)}
    if mode == "--save":
        head, optimizer = checkpoint_model(group, momentum_step=True)
        save_checkpoint(checkpoint, model=head, optimizer=optimizer, epoch=0, step=1, write=rank == 0)
        optimizer.step()  # saving gathered copies: the live momentum is still this rank's shard
        result["momentum_after_saving"] = optimizer.state[head.weight]["momentum_buffer"].clone()
        result["compiled"] = compiled_case(rank, world_size, group)
    else:  # --resume: the checkpoint saved on another number of ranks
        head, optimizer = checkpoint_model(group, momentum_step=False)
        load_checkpoint(checkpoint, model=head, optimizer=optimizer, restore_rng=False)
        result["resumed"] = dict(weight=head.weight.detach().clone(), bias=head.bias.detach().clone(),
                                 momentum=optimizer.state[head.weight]["momentum_buffer"].clone())
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
