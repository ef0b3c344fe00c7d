"""SGD implementations, AMP, channels_last / compile options and the training / prediction loops."""

import pytest
import torch
import torch.nn.functional as F

from fastlt.engine import autocast, build_sgd, grad_scaler, maybe_compile, predict, prepare_model, train_one_epoch
from fastlt.models import create_model


def test_fused_foreach_and_loop_sgd_agree():
    results = []
    for implementation in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 5)
        optimizer = build_sgd(model, lr=0.1, weight_decay=5e-4, nesterov=True, implementation=implementation)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1], results[2], rtol=1e-6, atol=1e-7)


def test_build_sgd_options():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen stage-2 backbone is left out
    optimizer = build_sgd(model, lr=0.2, momentum=0.9, weight_decay=1e-4, nesterov=True)
    group = optimizer.param_groups[0]
    assert len(group["params"]) == 2 and group["nesterov"] and group["fused"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.9, 1e-4)
    groups = build_sgd([{"params": model[1].parameters(), "lr": 0.01}], lr=0.1).param_groups
    assert groups[0]["lr"] == 0.01 and len(groups[0]["params"]) == 2
    with pytest.raises(ValueError, match="no trainable"):
        build_sgd(model[0], lr=0.1)
    with pytest.raises(ValueError, match="implementation"):
        build_sgd(model, lr=0.1, implementation="apex")


def test_amp_precisions_on_cpu():
    layer = torch.nn.Linear(4, 4)
    with autocast("cpu", "bf16"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        autocast("cpu", "fp16")
    assert not grad_scaler("cpu", "bf16").is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_grad_scaler_on_cuda():
    assert grad_scaler("cuda", "fp16").is_enabled()


def toy_loader(batches=4, batch_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batches * batch_size, 1, 28, 28, generator=generator)
    targets = torch.randint(0, 10, (batches * batch_size,), generator=generator)
    images += targets[:, None, None, None].float() * 0.5  # learnable signal
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=batch_size)


def ce(output, targets):
    assert output.logits.dtype == torch.float32  # losses run in fp32 even under bf16 autocast
    return F.cross_entropy(output.logits, targets)


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_train_one_epoch_learns_and_reports(precision, channels_last):
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = prepare_model(create_model("ride_small_cnn", num_classes=10), device, channels_last=channels_last)
    optimizer = build_sgd(model, lr=0.05)
    loader = toy_loader()
    steps = []
    first = train_one_epoch(model, loader, ce, optimizer, device=device, precision=precision,
                            channels_last=channels_last, on_step=lambda step, loss: steps.append(step))
    for _ in range(3):
        last = train_one_epoch(model, loader, ce, optimizer, device=device, precision=precision,
                               channels_last=channels_last)
    assert (first["steps"], first["samples"], steps) == (4, 64, [1, 2, 3, 4])
    assert last["loss"] < first["loss"]
    limited = train_one_epoch(model, loader, ce, optimizer, device=device, max_steps=2)
    assert limited["steps"] == 2


def test_predict_returns_logits_in_loader_order():
    model = create_model("small_cnn", num_classes=10)
    loader = toy_loader(batches=3, batch_size=5)
    logits, targets = predict(model, loader, device=torch.device("cpu"))
    assert logits.shape == (15, 10) and torch.equal(targets, loader.dataset.tensors[1])
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(logits, model(loader.dataset.tensors[0]).logits)


def test_compile_is_opt_in_and_keeps_model_output():
    model = create_model("ride_small_cnn", num_classes=10).eval()
    assert maybe_compile(model) is model
    compiled = maybe_compile(model, enabled=True, backend="eager")  # graph capture only: no C++ compile in tests
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images).expert_logits, model(images).expert_logits)
