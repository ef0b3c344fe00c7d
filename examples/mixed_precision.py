"""Mixed precision with fastlt: `torch.autocast` around the forward only (bf16 on CPU; bf16 or fp16 on CUDA), the
fused loss outside it on the low-precision logits.

The fused losses read fp16/bf16 logits as they are (no fp32 copy), accumulate in fp32 and return an fp32 loss;
the gradient they send back to the logits has the logits' dtype, and autocast hands fp32 gradients to the fp32
parameters. fp16 needs a GradScaler (its gradients underflow), bf16 does not.

    python examples/mixed_precision.py --epochs 3

The glue a user writes for fastlt is the lines marked `# fastlt`.
"""

import argparse

import torch
from torch import nn

import fastlt
from fastlt.data import DigitsLT


def autocast_dtype(device):
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere GPUs
    return torch.bfloat16


class ExpertCNN(nn.Module):
    """A small CNN trunk and one linear layer holding E expert heads; returns [E, B, C] (a strided view)."""

    def __init__(self, num_classes, num_experts=3, width=32):
        super().__init__()
        self.num_experts, self.num_classes = num_experts, num_classes
        self.trunk = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                   nn.Flatten(), nn.Linear(4 * width, 64), nn.ReLU())
        self.heads = nn.Linear(64, num_experts * num_classes)

    def forward(self, images):
        logits = self.heads(self.trunk(images))  # [B, E * C]
        return logits.unflatten(1, (self.num_experts, self.num_classes)).transpose(0, 1)  # [E, B, C], no copy


def train_step(model, criterion, optimizer, scaler, images, targets, device):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast_dtype(device)):
        expert_logits = model(images)  # bf16 (or fp16) from the autocast linear layers
    loss = criterion(expert_logits, targets)  # low-precision logits in; accumulated in fp32, fp32 loss out
    scaler.scale(loss).backward()  # scaling is a no-op unless fp16 (GradScaler(enabled=False))
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train(epochs=3, batch_size=64, steps_per_epoch=None, seed=0):
    """Trains with autocast and returns (model, per-epoch mean losses)."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = DigitsLT(split="train")
    images = torch.as_tensor(data.images, dtype=torch.float32).div(255).unsqueeze(1)
    dataset = torch.utils.data.TensorDataset(images, torch.as_tensor(data.targets))
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, drop_last=True)
    model = ExpertCNN(data.num_classes).to(device)
    criterion = fastlt.RIDELoss(data.class_counts, drw_epoch=epochs - 1).to(device)  # fastlt
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype(device) == torch.float16)
    epoch_losses = []
    for epoch in range(epochs):
        criterion.set_epoch(epoch)  # fastlt
        losses = []
        for step, (batch_images, batch_targets) in enumerate(loader):
            if step == steps_per_epoch:
                break
            losses.append(train_step(model, criterion, optimizer, scaler, batch_images.to(device),
                                     batch_targets.to(device), device))
        epoch_losses.append(torch.stack(losses).mean().item())
        print(f"epoch {epoch}: loss {epoch_losses[-1]:.4f}")
    return model, epoch_losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    train(parser.parse_args().epochs)
