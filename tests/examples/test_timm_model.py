"""examples/timm_model.py: a timm model trains with PriorShiftedCE on square-root-sampled batches, and tau = 0.5
is Balanced Softmax for the prior those batches follow."""

import numpy as np
import torch
import torch.nn.functional as F
from example_loader import load_example

timm_model = load_example("timm_model")


def test_timm_model_trains_with_the_sampler_and_the_loss():
    model, criterion, losses = timm_model.train("resnet10t", epochs=2, batch_size=32, steps_per_epoch=3,
                                                channels=(16, 32, 64, 128))  # a narrow ResNet-10-T: fast on CPU
    assert len(losses) == 2 and all(np.isfinite(losses))
    images, targets = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits = model.eval()(images)
    prior = criterion.class_counts / criterion.class_counts.sum()
    expected = F.cross_entropy(logits + 0.5 * prior.log().float(), targets)
    torch.testing.assert_close(criterion(logits.unsqueeze(0), targets), expected, rtol=1e-5, atol=1e-6)


def test_batches_follow_the_square_root_prior():
    loader, sampler, class_counts = timm_model.make_loader()
    labels = loader.dataset.tensors[1]
    drawn = np.concatenate([labels[sampler.indices(epoch)].numpy() for epoch in range(10)])
    frequencies = np.bincount(drawn, minlength=10) / drawn.size
    square_root_prior = np.sqrt(class_counts) / np.sqrt(class_counts).sum()
    np.testing.assert_allclose(frequencies, square_root_prior, atol=0.015)
    assert not np.array_equal(sampler.indices(0), sampler.indices(1))
