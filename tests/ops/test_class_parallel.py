"""Class-parallel fused heads (docs/methods.md 8.6) on 2 and 3 gloo ranks (tests/ops/class_parallel_worker.py under
torchrun) equal one process on the whole batch and the concatenated classifier: the loss and every gradient, for
RIDE (diversity, DRW), the prior-shifted CE (per-expert taus) and ResLT, C = 11 classes (a multiple of neither),
ignored rows, a batch whose targets all lie in the first shard, every backend, torch.compile, a DDP trunk; a
checkpoint saved on 2 ranks resumes on 1 and 3; logits and top-k over all classes."""

import os
import socket
import subprocess
import sys

import class_parallel_worker as worker
import pytest
import torch
from op_helpers import TOLERANCES

import fastlt
from fastlt.engine import load_checkpoint
from fastlt.ops import class_shard

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torchrun(world_size, out, *arguments):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_addr",
               "127.0.0.1", "--master_port", str(port), worker.__file__, str(out), *map(str, arguments)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPOSITORY_ROOT}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{W: every rank's results}: 2 ranks (which save a checkpoint), then 3 (which resume it)."""
    folder = tmp_path_factory.mktemp("class_parallel")
    checkpoint = folder / "head.pt"
    (folder / "w2").mkdir()
    (folder / "w3").mkdir()
    return {2: _torchrun(2, folder / "w2", "--save", checkpoint),
            3: _torchrun(3, folder / "w3", "--resume", checkpoint), "checkpoint": checkpoint}


def _one_process(name, world_size):
    """The case's loss and gradients (features, weight, bias) in one process on the whole batch."""
    features, weight, bias, target, counts, groups = worker.case_inputs(name, world_size)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (features, weight, bias)]
    loss = worker.head_loss(name, *leaves, target, counts, groups)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _whole(shards, dim):
    return torch.cat(shards, dim)


def _assert_close(actual, expected, dtype):
    atol, rtol = (1e-10, 1e-10) if dtype == torch.float64 else TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


CASE_RUNS = [(world_size, name, backend) for world_size in (2, 3)
             for backend, names in [("auto", list(worker.CASES)), *worker.BACKEND_CASES.items()]
             for name in names]


@pytest.mark.parametrize("world_size, name, backend", CASE_RUNS)
def test_loss_and_gradients_equal_one_process(runs, world_size, name, backend):
    head, options = worker.CASES[name]
    dtype = options.get("dtype", torch.float64)
    expected_loss, (features_grad, weight_grad, bias_grad) = _one_process(name, world_size)
    results = [rank_results["cases"][(name, backend)] for rank_results in runs[world_size]]
    class_dim = 0 if head == "reslt" else 1
    for result in results:  # every rank returns the whole batch's loss
        _assert_close(result["loss"], expected_loss, dtype)
    _assert_close(_whole([result["weight"] for result in results], class_dim), weight_grad, dtype)
    if bias_grad is not None:
        _assert_close(_whole([result["bias"] for result in results], class_dim), bias_grad, dtype)
    if options.get("gather_batch", True):  # each rank's rows
        _assert_close(_whole([result["features"] for result in results], features_grad.dim() - 2), features_grad,
                      dtype)
    else:  # every rank has the whole batch's gradient
        for result in results:
            _assert_close(result["features"], features_grad, dtype)


def test_a_shard_holding_none_of_the_batchs_targets_still_has_gradients(runs):
    """The case's targets are all among the first rank's classes; the other shards' classes are in every softmax."""
    for world_size in (2, 3):
        _, _, _, target, _, _ = worker.case_inputs("ride_targets_in_the_first_shard", world_size)
        first_stop = class_shard(worker.NUM_CLASSES, world_size, 0)[1]
        assert int(target[target >= 0].max()) < first_stop
        last = runs[world_size][-1]["cases"][("ride_targets_in_the_first_shard", "auto")]
        assert last["weight"].abs().sum() > 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_trunk_gets_the_gradient_of_the_whole_batch_loss(runs, world_size):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3 * worker.DIM).double()
    images = torch.randn(world_size * worker.LOCAL_ROWS, 4, dtype=torch.float64)
    target = torch.randint(0, worker.NUM_CLASSES, (world_size * worker.LOCAL_ROWS,))
    counts = torch.arange(worker.NUM_CLASSES, 0, -1).double() * 10
    head = fastlt.LinearRIDELoss(counts, 3, worker.DIM, chunk_size=4, drw_epoch=0).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, worker.NUM_CLASSES, worker.DIM, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64))
    features = trunk(images).view(-1, 3, worker.DIM).transpose(0, 1)
    loss = head(features, target)
    loss.backward()
    results = [rank_results["ddp"] for rank_results in runs[world_size]]
    for result in results:
        _assert_close(result["loss"], loss.detach(), torch.float64)
        for name, parameter in trunk.named_parameters():  # DDP's average of W times each rank's part
            _assert_close(result["trunk"][name], parameter.grad, torch.float64)
    _assert_close(_whole([result["head_weight"] for result in results], 1), head.weight.grad, torch.float64)
    rows = torch.randn(3, 4, worker.DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected_logits = head.logits(rows).detach()
    expected_values, expected_classes = head.topk(rows, 4)
    for result in results:  # every rank: the same rows' logits over all classes, and their top 4
        _assert_close(result["logits"], expected_logits, torch.float64)
        _assert_close(result["topk"][0], expected_values.detach(), torch.float64)
        assert torch.equal(result["topk"][1], expected_classes)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_raises_when_one_rank_refuses_its_arguments(runs, world_size):
    """Rank 1's labels out of range, then rank 0 one row short: a ValueError on every rank, no rank left waiting."""
    for rank, rank_results in enumerate(runs[world_size]):
        bad_target, fewer_rows = rank_results["refusals"]
        assert ("target must be in" if rank == 1 else "rank 1 of the process group refused its arguments") in bad_target
        assert "every rank must pass the same number of rows" in fewer_rows


def test_torch_compile_fullgraph_matches_one_process(runs):
    expected_loss, (features_grad, weight_grad, _) = _one_process("ride_cosine_drw_diversity", 2)
    results = [rank_results["compiled"] for rank_results in runs[2]]
    for result in results:
        _assert_close(result["loss"], expected_loss, torch.float64)
    _assert_close(_whole([result["weight"] for result in results], 1), weight_grad, torch.float64)
    _assert_close(_whole([result["features"] for result in results], 1), features_grad, torch.float64)


def test_a_checkpoint_saved_on_two_ranks_resumes_on_one_and_three(runs):
    trained, trained_optimizer = worker.checkpoint_model(None, momentum_step=True)  # one process, the same batch
    momentum = trained_optimizer.state[trained.weight]["momentum_buffer"]
    saved = torch.load(runs["checkpoint"], weights_only=True)
    assert tuple(saved["model"]["weight"].shape) == (2, worker.NUM_CLASSES, worker.DIM)  # whole, not a shard
    one, one_optimizer = worker.checkpoint_model(None, momentum_step=False)
    load_checkpoint(runs["checkpoint"], model=one, optimizer=one_optimizer, restore_rng=False)
    _assert_close(one.weight.detach(), trained.weight.detach(), torch.float64)
    _assert_close(one.bias.detach(), trained.bias.detach(), torch.float64)
    _assert_close(one_optimizer.state[one.weight]["momentum_buffer"], momentum, torch.float64)
    resumed = [rank_results["resumed"] for rank_results in runs[3]]
    _assert_close(_whole([part["weight"] for part in resumed], 1), trained.weight.detach(), torch.float64)
    _assert_close(_whole([part["bias"] for part in resumed], 1), trained.bias.detach(), torch.float64)
    _assert_close(_whole([part["momentum"] for part in resumed], 1), momentum, torch.float64)
    assert [part["weight"].shape[1] for part in resumed] == [4, 4, 3]
    # saving left each rank's optimizer with its own shard of the momentum
    assert [tuple(rank["momentum_after_saving"].shape) for rank in runs[2]] == [(2, 6, worker.DIM), (2, 5, worker.DIM)]


def test_class_shards_are_contiguous_and_cover_the_classes():
    for num_classes in (3, 10, 11, 1000):
        for world_size in (1, 2, 3, num_classes):
            shards = [class_shard(num_classes, world_size, rank) for rank in range(world_size)]
            assert shards[0][0] == 0 and shards[-1][1] == num_classes
            assert all(stop == next_start for (_, stop), (next_start, _) in zip(shards, shards[1:]))
            sizes = [stop - start for start, stop in shards]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_process_group_needs_torch_distributed_initialised():
    (features, weight), target = [torch.randn(2, 3, 4), torch.randn(2, 5, 4)], torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="process_group needs torch.distributed initialised"):
        fastlt.ops.linear_ride_loss(features, weight, target, torch.ones(5), process_group=object())


@pytest.mark.slow
def test_bench_fused_head_world_size_counts_what_it_sends(monkeypatch):
    """`fastlt bench fused-head --world-size 2` at C = 100 (measured) and 200 (computed: no memory left, as
    monkeypatched here): the class-parallel row sends exactly the gathered features, their reduce-scattered gradient,
    the target and the statistics (ring bytes), DDP twice (W - 1) / W of the gradient."""
    from fastlt.bench import fused_head, fused_head_parallel

    monkeypatch.setattr(fused_head_parallel, "_available_bytes", lambda: 1)  # after the first C: nothing fits
    rows = fused_head_parallel.run(quick=True, class_counts=(100, 200), world_size=2)
    assert [(row["C"], row["impl"]) for row in rows] == [(c, impl) for c in (100, 200)
                                                         for impl in fused_head_parallel.LAYOUTS]
    experts, batch, dim, world = fused_head.EXPERTS, fused_head.BATCH, fused_head.DIM, 2
    share = (world - 1) / world
    statistics = (2 * experts + 1 + 4 * experts + 1) * world * batch * 4  # maxima, then sums, gaps, target logits
    sent = ((world - 1) * experts * batch * dim * 4 + (world - 1) * batch * 8  # features and target gathered
            + share * experts * world * batch * dim * 4  # the features' gradient reduce-scattered
            + 2 * share * statistics + 2 * (world - 1) * 2 * 8)  # statistics; the two checks' all-gathers
    parallel, replicated, single = rows[:3]
    assert parallel["note"] == "measured" and parallel["sent_mb_per_rank"] * 2**20 == pytest.approx(sent)
    assert replicated["sent_mb_per_rank"] * 2**20 == pytest.approx(2 * share * experts * 100 * dim * 4)
    assert parallel["memory_vs_single"] == pytest.approx(parallel["head_mb_per_rank"] / single["head_mb_per_rank"])
    assert all(row["note"].startswith("computed") and row["ms"] is None for row in rows[3:])
    assert rows[4]["sent_mb_per_rank"] == pytest.approx(2 * replicated["sent_mb_per_rank"])  # DDP: linear in C
    assert rows[3]["sent_mb_per_rank"] == parallel["sent_mb_per_rank"]  # class-parallel: independent of C


def test_ddp_leaves_out_the_class_shards_and_their_modules_buffers():
    from fastlt import class_shards

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Module())
    model[2].weight = torch.nn.Parameter(torch.zeros(2, 4, 3))
    model[2].register_buffer("class_counts", torch.ones(11))
    class_shards.mark(model[2].weight, class_shards.ClassShard(None, 11, 4, 8, 1))
    assert class_shards.names_outside_ddp(model) == ["2.weight", "2.class_counts"]
    assert class_shards.has_class_shards(model) and not class_shards.has_class_shards(model[0])


def test_the_loss_hands_out_its_gradients_once_scaled_by_grad_output():
    from fastlt.ops._class_parallel import _AttachGradients

    features, weight = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    grads = torch.ones(2, 3), torch.full((4, 3), 2.0), torch.empty(0)
    loss = _AttachGradients.apply(torch.tensor(1.5), features, weight, None, *grads)
    (2.5 * loss).backward(retain_graph=True)
    assert torch.equal(features.grad, torch.full((2, 3), 2.5)) and torch.equal(weight.grad, torch.full((4, 3), 5.0))
    with pytest.raises(RuntimeError, match="second backward through the same graph is not supported"):
        loss.backward()


def test_a_gradient_penalty_through_the_class_parallel_loss_is_refused():
    """create_graph=True would silently drop the second-order terms: the handed-out gradients carry no graph."""
    from fastlt.ops._class_parallel import _AttachGradients

    features, weight = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = _AttachGradients.apply(torch.tensor(1.5), features, weight, None, torch.ones(2, 3), torch.ones(4, 3),
                                  torch.empty(0))
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad(loss, weight, create_graph=True)
