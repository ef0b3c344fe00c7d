"""examples/mixed_precision.py: the dtypes flow as documented (bf16 logits under autocast, fp32 loss, bf16
gradient into the logits, fp32 parameter gradients) and the fused loss equals the fp32 reference on those logits."""

import torch
from example_loader import load_example

import fastlt

mixed_precision = load_example("mixed_precision")


def test_dtypes_flow_as_documented():
    model = mixed_precision.ExpertCNN(num_classes=10)
    counts = torch.tensor([150, 116, 89, 69, 53, 41, 32, 25, 19, 15])
    criterion = fastlt.RIDELoss(counts, drw_epoch=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    seen = {}

    def record(module, inputs, logits):
        seen["logits"] = logits.detach()
        logits.register_hook(lambda grad: seen.update(logits_grad_dtype=grad.dtype))

    model.register_forward_hook(record)
    loss = mixed_precision.train_step(model, criterion, optimizer, scaler, images, targets, "cpu")
    assert mixed_precision.autocast_dtype("cpu") == torch.bfloat16
    assert seen["logits"].dtype == torch.bfloat16 and seen["logits"].shape == (3, 16, 10)
    assert loss.dtype == torch.float32
    assert seen["logits_grad_dtype"] == torch.bfloat16
    assert all(parameter.grad.dtype == torch.float32 for parameter in model.parameters())
    reference = fastlt.ops.ride_loss_reference(seen["logits"].float(), targets, counts.double(), drw=True)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_trains_under_autocast():
    _, losses = mixed_precision.train(epochs=2, steps_per_epoch=3)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
