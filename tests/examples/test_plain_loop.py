"""examples/plain_loop.py: the fused ops do not break the compiled graph, and a compiled step trained across the
DRW switch recompiles at most twice (once for the DRW switch, once when SGD creates its momentum buffers).

Both run on the compiled C++ kernels ("cpp" backend): with the default "auto" and no extension the ops would fall
back to the eager reference, and these tests would not see the fused ops at all."""

import torch
from example_loader import load_example
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import fastlt

plain_loop = load_example("plain_loop")
SMALL_TRUNK = (1, 1, 1, 1)  # a torchvision ResNet-10 trunk: same code path as ResNet-18, half the tracing


def small_setup():
    images, targets, train_set = plain_loop.digits("train")
    model = plain_loop.ExpertResNet(train_set.num_classes, blocks=SMALL_TRUNK)
    return model, fastlt.RIDELoss(train_set.class_counts, drw_epoch=1), images[:16], targets[:16]


@fastlt.ops.use_backend("cpp")
def test_fused_ops_cause_no_graph_break():
    torch._dynamo.reset()
    model, criterion, images, targets = small_setup()
    criterion.set_epoch(1)  # DRW on: class weights and per-class temperatures in the graph too
    forward_and_loss = torch._dynamo.explain(lambda x, y: criterion(model(x), y))(images, targets)
    assert forward_and_loss.graph_break_count == 0, forward_and_loss.break_reasons
    assert "fastlt.ride_loss" in str(forward_and_loss.graphs[0].graph)
    predict = torch._dynamo.explain(lambda x: fastlt.ops.expert_aggregate(model(x)))(images)
    assert predict.graph_break_count == 0 and "fastlt.expert_aggregate" in str(predict.graphs[0].graph)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    whole_step = torch._dynamo.explain(plain_loop.make_train_step(model, criterion, optimizer))(images, targets)
    reasons = [reason.reason for reason in whole_step.break_reasons]
    assert reasons and all("Tensor.backward" in reason for reason in reasons), reasons  # torch's own split only


@fastlt.ops.use_backend("cpp")
def test_compiled_step_recompiles_at_most_twice_over_12_epochs_across_drw():
    torch._dynamo.reset()
    counters.clear()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compile_id = torch._guards.CompileContext.current_compile_id()
        has_loss = "fastlt.ride_loss" in str(graph_module.graph)
        compiles.append((compile_id.frame_id, compile_id.frame_compile_id, has_loss))
        return aot_eager(graph_module, example_inputs)  # AOTAutograd as inductor: the ops' backward is traced too

    _, losses, _ = plain_loop.train(epochs=12, drw_epoch=8, batch_size=32, steps_per_epoch=1,
                                    blocks=SMALL_TRUNK, backend=counting_backend)
    recompiles = [entry for entry in compiles if entry[1] > 0]
    assert len(recompiles) <= 2, compiles
    loss_graph_compiles = [entry for entry in compiles if entry[2]]
    assert len(loss_graph_compiles) == 2, compiles  # the first compile and the DRW switch at epoch 8
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
