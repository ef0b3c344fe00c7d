"""fastlt with a timm model: `timm.create_model` + `fastlt.PriorShiftedCE` on batches drawn by
`fastlt.data.LongTailSampler`.

The sampler draws class j with probability proportional to sqrt(n_j) ("square_root"), so the training batches
follow the prior p_j ~ sqrt(n_j). Balanced Softmax for that prior adds log p_j = 0.5 * log(n_j / N) + const to
the logits: `PriorShiftedCE` with tau = 0.5. (Class-balanced sampling would need tau = 0, i.e. plain CE;
instance-balanced sampling tau = 1.)

    python examples/timm_model.py --model resnet10t --epochs 5

Data: Digits-LT (scikit-learn's 8x8 digits made long-tailed). The glue a user writes for fastlt is the lines
marked `# fastlt`.
"""

import argparse

import timm
import torch
from timm.optim import create_optimizer_v2

import fastlt
from fastlt.data import DigitsLT, LongTailSampler

SAMPLER_Q = 0.5  # square-root sampling: p_j ~ n_j ** q


def make_loader(batch_size=64, seed=0):
    data = DigitsLT(split="train")
    images = torch.as_tensor(data.images, dtype=torch.float32).div(255).unsqueeze(1)
    dataset = torch.utils.data.TensorDataset(images, torch.as_tensor(data.targets))
    sampler = LongTailSampler(data.targets, strategy="square_root", seed=seed)  # fastlt
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=True)
    return loader, sampler, data.class_counts


def train(model_name="resnet10t", epochs=5, batch_size=64, steps_per_epoch=None, seed=0, **model_options):
    """Trains and returns (model, criterion, per-epoch mean losses); `model_options` go to `timm.create_model`."""
    torch.manual_seed(seed)
    loader, sampler, class_counts = make_loader(batch_size, seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=len(class_counts), in_chans=1,
                              **model_options)
    criterion = fastlt.PriorShiftedCE(class_counts, taus=[SAMPLER_Q])  # fastlt: Balanced Softmax for that prior
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    epoch_losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # fastlt: a new (seeded) draw each epoch
        losses = []
        for step, (images, targets) in enumerate(loader):
            if step == steps_per_epoch:
                break
            loss = criterion(model(images).unsqueeze(0), targets)  # fastlt: one "expert", [1, B, C]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        epoch_losses.append(torch.stack(losses).mean().item())
        print(f"epoch {epoch}: loss {epoch_losses[-1]:.4f}")
    return model, criterion, epoch_losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="any timm model name (pretrained=False)")
    parser.add_argument("--epochs", type=int, default=5)
    options = parser.parse_args()
    train(options.model, options.epochs)
