"""fastlt in a Hugging Face `Trainer`: a `compute_loss` with `fastlt.PriorShiftedCE` (Balanced Softmax) for a small
ViT built from its config, correct under gradient accumulation.

With gradient accumulation the Trainer passes `num_items_in_batch` (the labelled rows of the whole accumulated
batch) and, for a model whose `forward` takes `**kwargs` as every transformers model does, expects the loss of a
micro-batch already divided by it: it does not divide by the number of accumulation steps itself. A per-batch mean
would come out `gradient_accumulation_steps` times too large, so `compute_loss` takes the loss with
`reduction="sum"` and divides it by `num_items_in_batch`: exactly the accumulated batch's mean for `PriorShiftedCE`
(docs/methods.md 6.5 says which terms of the other losses are row means). Padding labels (-100, the Trainer's and
torch's `ignore_index`) are skipped by the loss; `num_items_in_batch` does not count them either.

    python examples/hf_trainer.py --accumulation 4

Data: Digits-LT (scikit-learn's 8x8 digits made long-tailed). The glue a user writes for fastlt is the lines
marked `# fastlt`.
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import fastlt
from fastlt.data import DigitsLT


class DigitsForTrainer(torch.utils.data.Dataset):
    """Digits-LT as the dicts the Trainer's default collator stacks."""

    def __init__(self, split="train", limit=None):
        self.data = DigitsLT(split=split)
        self.length = len(self.data) if limit is None else min(limit, len(self.data))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        image, label = self.data[index]
        return {"pixel_values": image.float().div(255), "labels": label}


class BalancedSoftmaxTrainer(Trainer):
    def __init__(self, *args, class_counts, **kwargs):
        super().__init__(*args, **kwargs)
        self.criterion = fastlt.PriorShiftedCE(class_counts, taus=[1.0], reduction="sum").to(self.args.device)  # fastlt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.criterion(outputs.logits, labels)  # fastlt: the sum over the kept rows
        rows = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()  # fastlt: None in eval
        loss = loss / rows  # fastlt
        return (loss, outputs) if return_outputs else loss


def make_model(num_classes=10, seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_classes)
    return ViTForImageClassification(config)  # from its config: nothing is downloaded


def make_trainer(output_dir, accumulation=1, batch_size=32, max_steps=-1, epochs=1, limit=None, callbacks=None,
                 **training_options):
    dataset = DigitsForTrainer("train", limit)
    arguments = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size // accumulation,
        gradient_accumulation_steps=accumulation, num_train_epochs=epochs, max_steps=max_steps, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0, dataloader_num_workers=0,
        **training_options)
    return BalancedSoftmaxTrainer(model=make_model(), args=arguments, train_dataset=dataset,
                                  class_counts=dataset.data.class_counts, callbacks=callbacks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    options = parser.parse_args()
    result = make_trainer(options.output_dir, options.accumulation, epochs=3).train()
    print(f"training loss {result.training_loss:.4f}")
