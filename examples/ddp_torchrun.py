"""fastlt under DDP in your own script, launched by torchrun: `fastlt.data.LongTailSampler` shards the class-balanced
draw per rank, `fastlt.RIDELoss` trains three expert heads. gloo on CPU, nccl on GPUs.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --epochs 3

Every rank builds the same global draw for (seed, epoch) and keeps its slots rank::world_size, so the shards are
disjoint and equal-length: no DistributedSampler around it. Data: Digits-LT (scikit-learn's 8x8 digits made
long-tailed). The glue a user writes for fastlt is the lines marked `# fastlt`.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastlt
from fastlt.data import DigitsLT, LongTailSampler


class ExpertCNN(nn.Module):
    """A small CNN trunk and one linear layer holding E expert heads; returns [E, B, C] (a strided view)."""

    def __init__(self, num_classes, num_experts=3):
        super().__init__()
        self.num_experts, self.num_classes = num_experts, num_classes
        self.trunk = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                   nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.Linear(64, num_experts * num_classes)

    def forward(self, images):
        logits = self.heads(self.trunk(images))
        return logits.unflatten(1, (self.num_experts, self.num_classes)).transpose(0, 1)


def main(epochs=3, drw_epoch=2, batch_size=32, steps_per_epoch=None, report_dir=None):
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # rank, world size, address: from torchrun
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    data = DigitsLT(split="train")
    images = torch.as_tensor(data.images, dtype=torch.float32).div(255).unsqueeze(1)
    dataset = torch.utils.data.TensorDataset(images, torch.as_tensor(data.targets))
    sampler = LongTailSampler(data.targets, strategy="class_balanced", seed=0)  # fastlt: this rank's shard
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)  # DDP also broadcasts rank 0's initial weights
    model = ExpertCNN(data.num_classes).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    criterion = fastlt.RIDELoss(data.class_counts, drw_epoch=drw_epoch).to(device)  # fastlt
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    report = {"indices": [], "losses": []}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # fastlt: same global draw on every rank, a new one each epoch
        criterion.set_epoch(epoch)  # fastlt
        report["indices"].append(sampler.indices())  # what this rank's loader iterates this epoch
        for step, (batch_images, batch_targets) in enumerate(loader):
            if step == steps_per_epoch:
                break
            loss = criterion(model(batch_images.to(device)), batch_targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks
            optimizer.step()
            report["losses"].append(loss.item())
        if rank == 0:
            print(f"epoch {epoch}: loss {report['losses'][-1]:.4f} (DRW {'on' if criterion.drw else 'off'})")

    if report_dir is not None:
        report["state"] = {name: value.cpu() for name, value in model.module.state_dict().items()}
        torch.save(report, os.path.join(report_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank leaves while a peer may still be in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--drw-epoch", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--report-dir", default=None, help="each rank saves its sampled indices, losses and weights")
    options = parser.parse_args()
    main(options.epochs, options.drw_epoch, steps_per_epoch=options.steps_per_epoch, report_dir=options.report_dir)
