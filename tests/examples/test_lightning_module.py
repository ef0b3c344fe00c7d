"""examples/lightning_module.py: Lightning drives the 0-based epochs of the loss and the sampler, and the
datamodule's LongTailSampler gives class-balanced batches."""

import numpy as np
import torch
from example_loader import load_example

lightning_module = load_example("lightning_module")


class RecordingModule(lightning_module.LongTailModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs_seen, self.labels_seen = [], []

    def on_train_batch_start(self, batch, batch_index):
        self.labels_seen.append(batch[1].clone())

    def on_train_epoch_end(self):
        sampler = self.trainer.train_dataloader.sampler
        self.epochs_seen.append((self.current_epoch, self.criterion.epoch, self.criterion.drw, sampler.epoch))


def test_lightning_sets_the_epochs_and_the_sampler_balances_classes(tmp_path):
    module, datamodule, trainer = lightning_module.fit(
        max_epochs=3, drw_epoch=2, module_class=RecordingModule, accelerator="cpu", limit_train_batches=3,
        limit_val_batches=1, enable_progress_bar=False, default_root_dir=str(tmp_path))
    assert module.epochs_seen == [(0, 0, False, 0), (1, 1, False, 1), (2, 2, True, 2)]
    assert np.isfinite(float(trainer.callback_metrics["train_loss"]))
    seen = torch.bincount(torch.cat(module.labels_seen), minlength=10)  # 3 epochs x 3 batches x 64 = 576 rows
    assert seen.sum() == 576
    # class-balanced: ~58 per class; instance-balanced draws would give the 15-image tail class ~14
    assert seen.min() >= 35, seen
    assert datamodule.class_counts.min() * 576 / datamodule.class_counts.sum() < 15
