"""fastlt in Lightning: a `LightningModule` trained with `fastlt.RIDELoss` (DRW switched in `on_train_epoch_start`)
on batches drawn by `fastlt.data.LongTailSampler` through a `LightningDataModule`.

Lightning calls `set_epoch(current_epoch)` (0-based) on the sampler before every epoch, as fastlt's samplers and
losses expect. Under DDP pass `use_distributed_sampler=False`: the sampler shards itself per rank (Lightning would
otherwise wrap it in a second, distributed sampler and each rank would see a shard of its shard).

    python examples/lightning_module.py --epochs 10

Data: Digits-LT (scikit-learn's 8x8 digits made long-tailed). The glue a user writes for fastlt is the lines
marked `# fastlt`.
"""

import argparse

import lightning as L
import torch
from torch import nn

import fastlt
from fastlt.data import DigitsLT, LongTailSampler


def digits_tensors(split):
    data = DigitsLT(split=split)
    images = torch.as_tensor(data.images, dtype=torch.float32).div(255).unsqueeze(1)
    return torch.utils.data.TensorDataset(images, torch.as_tensor(data.targets)), data


class DigitsLTDataModule(L.LightningDataModule):
    def __init__(self, batch_size=64, strategy="class_balanced", seed=0):
        super().__init__()
        self.batch_size, self.strategy, self.seed = batch_size, strategy, seed
        self.train_set, data = digits_tensors("train")
        self.targets, self.class_counts = data.targets, data.class_counts

    def train_dataloader(self):
        sampler = LongTailSampler(self.targets, strategy=self.strategy, seed=self.seed)  # fastlt
        return torch.utils.data.DataLoader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(digits_tensors("test")[0], batch_size=256)


class LongTailModule(L.LightningModule):
    def __init__(self, class_counts, num_experts=3, drw_epoch=6, lr=0.05):
        super().__init__()
        self.num_experts, self.num_classes, self.lr = num_experts, len(class_counts), lr
        self.trunk = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                   nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.Linear(64, num_experts * self.num_classes)  # E expert heads in one layer
        self.criterion = fastlt.RIDELoss(class_counts, drw_epoch=drw_epoch)  # fastlt

    def forward(self, images):
        logits = self.heads(self.trunk(images))
        return logits.unflatten(1, (self.num_experts, self.num_classes)).transpose(0, 1)  # [E, B, C] view

    def on_train_epoch_start(self):
        self.criterion.set_epoch(self.current_epoch)  # fastlt: 0-based, as Lightning counts

    def training_step(self, batch, batch_index):
        images, targets = batch
        loss = self.criterion(self(images), targets)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_index):
        images, targets = batch
        logits = fastlt.ops.expert_aggregate(self(images))  # fastlt: mean of the experts
        self.log("val_accuracy", (logits.argmax(1) == targets).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def fit(max_epochs=10, drw_epoch=6, module_class=LongTailModule, **trainer_options):
    """Fits and returns (module, datamodule, trainer); `trainer_options` go to `lightning.Trainer`."""
    L.seed_everything(0, verbose=False)
    datamodule = DigitsLTDataModule()
    module = module_class(datamodule.class_counts, drw_epoch=drw_epoch)
    options = dict(max_epochs=max_epochs, accelerator="auto", devices=1, use_distributed_sampler=False,
                   logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    _, _, trainer = fit(parser.parse_args().epochs)
    print({name: float(value) for name, value in trainer.callback_metrics.items()})
