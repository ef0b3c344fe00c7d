"""The torch-side augmentations, the same recipes as the DALI pipelines in `fastlt.data.dali` (docs/methods.md 1.4).

- Arrays (CIFAR/MNIST-style): pad-4 random crop + horizontal flip (+ random rotation, 15 degrees in RIDE's CIFAR
  recipe), normalise. Applied to a whole uint8 batch at once (`ArrayBatchAugment`), in the DataLoader workers.
- JPEG files: train = RandomResizedCrop 224 + flip (+ ColorJitter 0.4/0.4/0.4 where the recipe says so),
  test = resize 256 + center crop 224, normalise (`jpeg_transform`, torchvision on PIL images).

Every training recipe flips unless `flip=False` (digits: a mirrored 2, 5 or 7 is another digit or none).
"""

import math

import torch
import torch.nn.functional as F

# (mean, std) on the 0..1 scale.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inaturalist": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.305,), (0.375,)),
}


def check_flip(flip):
    """`flip` must be a real bool: a YAML typo such as ``flip: "false"`` would otherwise read as true."""
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be true or false (horizontal flip in training), got {flip!r}")
    return flip


class ArrayBatchAugment:
    """uint8 [B, C, H, W] -> normalised float32 [B, C, H, W], with random pad-crop / flip / rotation if `train`
    (the flip only if `flip`).

    >>> augment = ArrayBatchAugment(train=True, mean=(0.5,), std=(0.5,), rotation=15)
    >>> augment(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape
    torch.Size([4, 1, 28, 28])
    """

    def __init__(self, train, mean, std, pad=4, rotation=0.0, flip=True, generator=None):
        self.train = train
        self.flip = check_flip(flip)
        # on the 0..255 scale, as DALI's crop_mirror_normalize: the same float results on both paths
        self.mean = 255.0 * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = 255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = pad
        self.rotation = rotation
        self.generator = generator

    def __call__(self, images):
        if self.train and self.pad:
            images = self._random_crop(images)
        if self.train and self.flip:
            flip = torch.rand(len(images), generator=self.generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = images.float()
        if self.train and self.rotation:
            images = self._random_rotation(images)
        return (images - self.mean) / self.std

    def _random_crop(self, images):
        """Zero-pad by `pad` and cut a random H x W window per image (torchvision RandomCrop(H, padding=pad))."""
        batch, _, height, width = images.shape
        padded = F.pad(images, (self.pad,) * 4)
        top = torch.randint(0, 2 * self.pad + 1, (batch, 1), generator=self.generator)
        left = torch.randint(0, 2 * self.pad + 1, (batch, 1), generator=self.generator)
        rows = (top + torch.arange(height)).view(batch, 1, height, 1)
        cols = (left + torch.arange(width)).view(batch, 1, 1, width)
        return padded[torch.arange(batch).view(-1, 1, 1, 1), torch.arange(images.shape[1]).view(1, -1, 1, 1),
                      rows, cols]

    def _random_rotation(self, images):
        """Rotate each image by U(-rotation, rotation) degrees about its centre, nearest pixels, zero fill."""
        angles = (torch.rand(len(images), generator=self.generator) * 2 - 1) * math.radians(self.rotation)
        cos, sin = torch.cos(angles), torch.sin(angles)
        zeros = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def jpeg_transform(train, mean, std, image_size=224, resize_size=256, color_jitter=0.0, flip=True):
    """torchvision transform from a PIL image to a normalised float32 CHW tensor (the ImageNet-LT recipe)."""
    from torchvision.transforms import v2

    check_flip(flip)
    if train:
        steps = [v2.RandomResizedCrop(image_size, antialias=True)] + ([v2.RandomHorizontalFlip()] if flip else [])
        if color_jitter:
            steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        steps = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)]
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
