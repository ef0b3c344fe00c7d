"""fastlt in a plain PyTorch loop: a torchvision ResNet trunk with three cosine expert heads trained with
`fastlt.RIDELoss` (LDAM-DRW + diversity), the model and the whole train step under `torch.compile`.

    python examples/plain_loop.py --epochs 12 --drw-epoch 8

Data: Digits-LT (scikit-learn's 8x8 digits made long-tailed, 10 classes; nothing is downloaded). The glue a user
writes for fastlt is the lines marked `# fastlt`.
"""

import argparse

import torch
import torchvision
from torch import nn

import fastlt
from fastlt.data import DigitsLT
from fastlt.models import NormedLinear


class ExpertResNet(nn.Module):
    """torchvision ResNet trunk (ResNet-18 by default) + E cosine-classifier heads (RIDE's scaled cosine logits)
    -> [E, B, C] logits."""

    def __init__(self, num_classes, num_experts=3, blocks=(2, 2, 2, 2), in_channels=1, scale=30.0):
        super().__init__()
        self.trunk = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, list(blocks))
        self.trunk.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)  # 8x8 images: no 7x7/2 stem
        self.trunk.maxpool, self.trunk.fc = nn.Identity(), nn.Identity()
        self.num_experts, self.num_classes = num_experts, num_classes
        self.heads = NormedLinear(512, num_experts * num_classes, scale=scale)  # fastlt: RIDE's cosine experts

    def forward(self, images):
        logits = self.heads(self.trunk(images))  # [B, E * C]
        return logits.unflatten(1, (self.num_experts, self.num_classes)).transpose(0, 1)  # [E, B, C], no copy


def digits(split):
    data = DigitsLT(split=split)
    images = torch.as_tensor(data.images, dtype=torch.float32).div(255).unsqueeze(1)  # [N, 1, 8, 8]
    return images, torch.as_tensor(data.targets), data


def make_train_step(model, criterion, optimizer):
    def train_step(images, targets):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), targets)
        loss.backward()  # Dynamo splits the step here (Tensor.backward); AOTAutograd compiles the backward graph
        optimizer.step()  # the first step creates the momentum buffers: Dynamo compiles this part twice
        return loss.detach()

    return train_step


def train(epochs=12, drw_epoch=8, batch_size=64, steps_per_epoch=None, blocks=(2, 2, 2, 2), backend="inductor",
          seed=0):
    """Trains and returns (model, per-epoch mean losses, test accuracy)."""
    torch.manual_seed(seed)
    images, targets, train_set = digits("train")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size,
                                         shuffle=True, drop_last=True)  # one batch shape: no recompile at the end
    model = ExpertResNet(train_set.num_classes, blocks=blocks)
    criterion = fastlt.RIDELoss(train_set.class_counts, drw_epoch=drw_epoch)  # fastlt
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    train_step = torch.compile(make_train_step(model, criterion, optimizer), backend=backend)

    epoch_losses = []
    for epoch in range(epochs):
        criterion.set_epoch(epoch)  # fastlt: 0-based; DRW from epoch `drw_epoch` on (one recompile, at the switch)
        losses = []
        for step, (batch_images, batch_targets) in enumerate(loader):
            if step == steps_per_epoch:
                break
            losses.append(train_step(batch_images, batch_targets))
        epoch_losses.append(torch.stack(losses).mean().item())
        print(f"epoch {epoch}: loss {epoch_losses[-1]:.4f} (DRW {'on' if criterion.drw else 'off'})")

    test_images, test_targets, _ = digits("test")
    inference_model = torch.compile(model.eval(), backend=backend)
    with torch.no_grad():
        logits = fastlt.ops.expert_aggregate(inference_model(test_images))  # fastlt: mean over experts, [B, C]
    accuracy = (logits.argmax(1) == test_targets).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    return model, epoch_losses, accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--drw-epoch", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    arguments = parser.parse_args()
    train(arguments.epochs, arguments.drw_epoch, backend=arguments.backend)
