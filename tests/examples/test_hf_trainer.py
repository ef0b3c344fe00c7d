"""examples/hf_trainer.py: gradient accumulation 1 and 4 give the same loss and the same gradients."""

import torch
from example_loader import load_example
from transformers import TrainerCallback

import fastlt

hf_trainer = load_example("hf_trainer")


class RecordGradients(TrainerCallback):
    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def one_step(tmp_path, accumulation, trainer_class=None):
    recorder = RecordGradients()
    # one optimizer step over the same 32 rows, gradients not clipped
    trainer = hf_trainer.make_trainer(str(tmp_path / f"ga{accumulation}"), accumulation, batch_size=32, max_steps=1,
                                      limit=32, callbacks=[recorder], max_grad_norm=0.0)
    if trainer_class is not None:
        trainer.__class__ = trainer_class
    return trainer.train().training_loss, recorder.gradients


def test_accumulation_1_and_4_give_the_same_loss_and_gradients(tmp_path):
    loss_1, gradients_1 = one_step(tmp_path, 1)
    loss_4, gradients_4 = one_step(tmp_path, 4)
    assert abs(loss_1 - loss_4) <= 1e-5 * abs(loss_1), (loss_1, loss_4)
    assert gradients_1.keys() == gradients_4.keys() and len(gradients_1) > 4
    for name, gradient in gradients_1.items():
        torch.testing.assert_close(gradients_4[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


class MeanLossTrainer(hf_trainer.BalancedSoftmaxTrainer):
    """What a user would write first: the loss's batch mean, ignoring num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        return fastlt.PriorShiftedCE(self.criterion.class_counts, taus=[1.0])(model(**inputs).logits, labels)


def test_a_batch_mean_would_be_accumulation_times_too_large(tmp_path):
    loss_1, gradients_1 = one_step(tmp_path, 1, MeanLossTrainer)
    loss_4, gradients_4 = one_step(tmp_path, 4, MeanLossTrainer)
    assert abs(loss_4 / loss_1 - 4) < 0.5, (loss_1, loss_4)  # why compute_loss divides by num_items_in_batch
    ratio = gradients_4["classifier.bias"].norm() / gradients_1["classifier.bias"].norm()
    assert abs(ratio - 4) < 0.5, ratio
