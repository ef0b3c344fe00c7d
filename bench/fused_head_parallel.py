"""`fastlt bench fused-head --world-size W`: the class-parallel fused head (docs/methods.md 8.6) on W processes
against the replicated fused head under DistributedDataParallel, and the single-device fused head.

RIDE's head as `fastlt bench fused-head` runs it (E = 3 cosine classifiers, D = 512, DRW on, fp32), B = 256 rows per
rank, so W x 256 rows in all; W processes over gloo on the CPU (nccl with one GPU per rank where there are W GPUs).
Rows, per C:

- ``class-parallel``: each rank holds its shard of the classes (``linear_ride_loss(process_group=...)``);
- ``replicated + DDP``: each rank holds the whole weight, the loss of its 256 rows, and DDP all-reduces the weight's
  gradient;
- ``single device``: one process, the whole batch (W x 256 rows) and the whole weight (the reference for memory).

Columns: ``ms`` the fwd+bwd step time (median, the slowest rank); ``head_mb_per_rank`` = the weight this rank holds
+ its gradient (+ DDP's gradient bucket, as large again) + the peak of everything else the step allocates (chunk
buffers, row norms, per-class tables, the gathered features and their gradient, the statistics), from the torch
profiler's allocator events as `fastlt bench fused-head` measures them (CUDA: the allocator's peak); the features'
own gradient is not counted. ``sent_mb_per_rank`` = the bytes a rank sends per step with ring collectives
(all-reduce 2 (W - 1) / W of the tensor, all-gather W - 1 times the input, reduce-scatter (W - 1) / W of the
input): class-parallel, counted over the functional collectives the step runs; DDP, its bucket all-reduce of the
whole gradient. A row whose processes would not fit in the machine's available memory (a linear fit over the
smaller C measured for that layout) is computed from the fit and says so. Then, per C, ``memory_vs_single`` (head
memory per rank / the single device's) and ``sent_ddp_over_class_parallel``.
"""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import fastlt
from fastlt.bench.fused_head import BATCH, DIM, EXPERTS, _predicted_bytes
from fastlt.bench.losses import long_tailed_counts, peak_extra_bytes
from fastlt.bench.timing import measure, progress
from fastlt.ops import class_shard

CLASS_COUNTS = (20_000, 100_000, 1_000_000)
QUICK_CLASS_COUNTS = (2_000, 10_000)
LAYOUTS = ("class-parallel", "replicated + DDP", "single device")
MEMORY_SHARE = 0.8  # of MemAvailable the processes of one row may take


def problem(quick=False, world_size=2):
    sizes = QUICK_CLASS_COUNTS if quick else CLASS_COUNTS
    return (f"E={EXPERTS}, D={DIM}, B={BATCH} per rank, W={world_size} ranks ({_backend()}), fp32, RIDE with DRW, "
            f"C in {sizes}, fwd+bwd; head memory per rank = weight + gradient (+ DDP bucket) + the step's peak "
            f"working memory; bytes sent per rank per step with ring collectives")


def _backend():
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"


class CollectiveBytes(TorchDispatchMode):
    """The bytes this rank sends in the functional collectives that run under the mode (backward included), counted
    as ring algorithms send them."""

    def __init__(self, world_size):
        super().__init__()
        self.world_size, self.sent = world_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("_c10d_functional::"):
            size = args[0].numel() * args[0].element_size()
            share = (self.world_size - 1) / self.world_size
            if "all_reduce" in name:
                self.sent += 2 * share * size
            elif "all_gather" in name:
                self.sent += (self.world_size - 1) * size
            elif "reduce_scatter" in name:
                self.sent += share * size
        return func(*args, **(kwargs or {}))


class _ReplicatedHead(torch.nn.Module):
    """The whole [E, C, D] weight and the fused loss of the rank's rows: what DDP replicates."""

    def __init__(self, weight, counts):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.register_buffer("counts", counts)

    def forward(self, features, target):
        return fastlt.ops.linear_ride_loss(features, self.weight, target, self.counts, drw=True)


def _rank_main(rank, world_size, port, layout, num_classes, repeats, out):
    """One rank of a row: the step's time, the head's memory and the bytes sent, written to <out>/<rank>.pt."""
    use_cuda = _backend() == "nccl"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if layout != "single device":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(_backend(), rank=rank, world_size=world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.manual_seed(rank)
    rows = BATCH * (world_size if layout == "single device" else 1)
    features = torch.randn(EXPERTS, rows, DIM, device=device, requires_grad=True)
    target = torch.randint(0, num_classes, (rows,), device=device)
    counts = long_tailed_counts(num_classes).to(device)
    start, stop = class_shard(num_classes, world_size, rank) if layout == "class-parallel" else (0, num_classes)
    weight = torch.randn(EXPERTS, stop - start, DIM, device=device, requires_grad=True)
    bucket_bytes = 0
    if layout == "class-parallel":
        def loss():
            return fastlt.ops.linear_ride_loss(features, weight, target, counts, drw=True,
                                               process_group=dist.group.WORLD)
    elif layout == "replicated + DDP":
        head = _ReplicatedHead(weight.detach(), counts)
        weight = head.weight
        ddp = torch.nn.parallel.DistributedDataParallel(head, device_ids=[rank] if use_cuda else None)
        bucket_bytes = weight.numel() * weight.element_size()  # DDP's flat gradient bucket (default layout)

        def loss():
            return ddp(features, target)
    else:
        def loss():
            return fastlt.ops.linear_ride_loss(features, weight, target, counts, drw=True)

    def step():
        features.grad = weight.grad = None
        loss().backward()

    median_ms, _ = measure(step, warmup=1, repeats=repeats)
    gradient_bytes = (features.numel() + weight.numel()) * 4
    counter = CollectiveBytes(world_size)
    with counter:  # the memory step also counts the class-parallel head's collectives
        extra = peak_extra_bytes(step, keep_bytes=gradient_bytes, device=device)
    sent = counter.sent
    if layout == "replicated + DDP":  # DDP's bucket all-reduce runs in its reducer, outside the dispatcher
        sent = 2 * (world_size - 1) / world_size * bucket_bytes
    weight_bytes = weight.numel() * weight.element_size()
    torch.save(dict(ms=median_ms, head_bytes=2 * weight_bytes + bucket_bytes + extra, sent=sent),
               os.path.join(out, f"{rank}.pt"))
    if layout != "single device":
        dist.barrier()
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _available_bytes():
    """MemAvailable (CPU) or the smallest GPU's free memory."""
    if _backend() == "nccl":
        return min(torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count()))
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _measure_row(layout, num_classes, world_size, repeats):
    processes = 1 if layout == "single device" else world_size
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(processes, _free_port(), layout, num_classes, repeats, out), nprocs=processes)
        ranks = [torch.load(os.path.join(out, f"{rank}.pt")) for rank in range(processes)]
    return dict(ms=max(rank["ms"] for rank in ranks), head_mb_per_rank=max(r["head_bytes"] for r in ranks) / 2**20,
                sent_mb_per_rank=max(rank["sent"] for rank in ranks) / 2**20, note="measured")


def run(quick: bool = False, world_size: int = 2, class_counts=None) -> list[dict]:
    """One row per (C, layout), then each C's ratios on its class-parallel row."""
    if world_size < 2:
        raise ValueError(f"fastlt bench fused-head: --world-size must be >= 2, got {world_size}")
    sizes = class_counts or (QUICK_CLASS_COUNTS if quick else CLASS_COUNTS)
    rows, history = [], {}
    for num_classes in progress(sizes, f"fastlt bench fused-head --world-size {world_size}"):
        block = {}
        for layout in LAYOUTS:
            processes = 1 if layout == "single device" else world_size
            predicted = _predicted_bytes(history.get(layout, []), num_classes)
            if predicted is not None and predicted * processes > MEMORY_SHARE * _available_bytes():
                sent = 0.0
                if layout != "single device":  # bytes scale with C for DDP, not for the class-parallel head
                    previous = [row for row in rows if row["impl"] == layout][-1]
                    scale = num_classes / previous["C"] if layout == "replicated + DDP" else 1.0
                    sent = previous["sent_mb_per_rank"] * scale
                block[layout] = dict(ms=None, head_mb_per_rank=predicted / 2**20, sent_mb_per_rank=sent,
                                     note=f"computed: {processes} x {predicted / 2**30:.1f} GiB do not fit here")
            else:
                repeats = 1 if quick or num_classes >= 100_000 else 3
                block[layout] = _measure_row(layout, num_classes, world_size, repeats)
            history.setdefault(layout, []).append((num_classes, block[layout]["head_mb_per_rank"] * 2**20))
            rows.append(dict(C=num_classes, W=world_size, impl=layout, **block[layout]))
        parallel = rows[-3]
        parallel["memory_vs_single"] = parallel["head_mb_per_rank"] / block["single device"]["head_mb_per_rank"]
        parallel["sent_ddp_over_class_parallel"] = (block["replicated + DDP"]["sent_mb_per_rank"]
                                                    / max(parallel["sent_mb_per_rank"], 1e-12))
    return rows


if __name__ == "__main__":
    from fastlt.bench.timing import format_table

    print(format_table(run()))
