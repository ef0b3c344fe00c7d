"""Tiny data and a resumable sampler for the engine tests."""

import random

import numpy as np
import torch


class ResumableShuffle(torch.utils.data.Sampler):
    """A seeded per-epoch permutation that can restart mid-epoch (the interface fastlt.data samplers provide)."""

    def __init__(self, size, seed=0):
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        start, self.position = self.position, 0
        return iter(order[start:])

    def state_dict(self, consumed=None):
        return {"epoch": self.epoch, "position": consumed or 0}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


class Digits(torch.utils.data.Dataset):
    """Fixed 28x28 images with a learnable class signal; `noisy` adds augmentation noise drawn from the global
    torch / numpy / python generators, so a resume that forgets any RNG state changes the result."""

    def __init__(self, size=48, noisy=True, seed=1):
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 10, (size,), generator=generator)
        self.images = torch.randn(size, 1, 28, 28, generator=generator) + 0.5 * self.targets[:, None, None, None]
        self.noisy = noisy

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        if self.noisy:
            image = image + 0.1 * torch.randn(1, 28, 28) + float(np.random.rand()) * 0.01 + random.random() * 0.01
        return image, self.targets[index]
