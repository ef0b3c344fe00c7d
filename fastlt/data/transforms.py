"""The torch-side augmentations, the same recipes as the DALI pipelines in `fastlt.data.dali` (docs/methods.md 1.4).

- Arrays (CIFAR/MNIST-style): pad-4 random crop + horizontal flip (+ random rotation, 15 degrees in RIDE's CIFAR
  recipe), normalise. Applied to a whole uint8 batch at once (`ArrayBatchAugment`), in the DataLoader workers.
- JPEG files: train = RandomResizedCrop 224 + flip (+ ColorJitter 0.4/0.4/0.4 where the recipe says so),
  test = resize 256 + center crop 224, normalise (`jpeg_transform`, torchvision on PIL images).

Every training recipe flips unless `flip=False` (digits: a mirrored 2, 5 or 7 is another digit or none).

SADE's test-time views (`StrongAugment`, presets `SADE_VIEWS`; docs/methods.md 8.3) add the official strong colour
augmentation to the random crop and flip: batched on arrays (`ArrayBatchAugment(strong=...)`, the same maths as
torchvision's ColorJitter / RandomGrayscale), torchvision + Pillow on JPEGs (`jpeg_view_transform`).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastlt._optional import import_optional

# (mean, std) on the 0..1 scale.
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inaturalist": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),  # the 60k training images' pixel mean and std
    "digits": ((0.305,), (0.375,)),
}


def check_flip(flip):
    """`flip` must be a real bool: a YAML typo such as ``flip: "false"`` would otherwise read as true."""
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be true or false (horizontal flip in training), got {flip!r}")
    return flip


@dataclass(frozen=True)
class StrongAugment:
    """The strong augmentation of SADE's two test-time views (the official test_training_*.py, a MoCo v2 recipe):
    after the random crop, ColorJitter(*jitter) with probability jitter_p, RandomGrayscale(grayscale_p), a Gaussian
    blur of standard deviation ~ U(*blur_sigma) with probability blur_p, and the horizontal flip. crop_scale is the
    RandomResizedCrop scale of the JPEG path (arrays keep their pad-4 random crop, as the official CIFAR view)."""

    blur_p: float
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: Tuple[float, float] = (0.1, 2.0)


# The official views per dataset. On one-channel (MNIST-style) images the CIFAR view applies as torchvision would:
# saturation, hue and grayscale leave a grey image unchanged, so brightness and contrast jitter, the blur and the crop
# remain (the flip as the recipe says).
SADE_VIEWS = {
    "cifar": StrongAugment(blur_p=0.2),  # test_training_cifar.py: RandomCrop(32, padding=4)
    "imagenet": StrongAugment(blur_p=0.5),  # ImageNet-LT and Places-LT: RandomResizedCrop(224, scale=(0.2, 1))
    "inaturalist": StrongAugment(blur_p=0.5, crop_scale=(0.08, 1.0)),  # RandomResizedCrop(224): the default scale
}
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


class ArrayBatchAugment:
    """uint8 [B, C, H, W] -> normalised float32 [B, C, H, W], with random pad-crop / flip / rotation if `train`
    (the flip only if `flip`), then `strong` (a StrongAugment: SADE's test-time views) if given.

    >>> augment = ArrayBatchAugment(train=True, mean=(0.5,), std=(0.5,), rotation=15)
    >>> augment(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape
    torch.Size([4, 1, 28, 28])
    """

    def __init__(self, train, mean, std, pad=4, rotation=0.0, flip=True, generator=None,
                 strong: Optional[StrongAugment] = None):
        self.train = train
        self.flip = check_flip(flip)
        # on the 0..255 scale, as DALI's crop_mirror_normalize: the same float results on both paths
        self.mean = 255.0 * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = 255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = pad
        self.rotation = rotation
        self.generator = generator
        self.strong = strong

    def __call__(self, images):
        if self.train and self.pad:
            images = self._random_crop(images)
        if self.train and self.flip:
            flip = torch.rand(len(images), generator=self.generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = images.float()
        if self.train and self.rotation:
            images = self._random_rotation(images)
        if self.strong is not None:
            images = 255.0 * strong_color_augment(images / 255.0, self.strong, self.generator)
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
    v2 = import_optional("torchvision.transforms.v2", "the torch loader of JPEG list files (data.loader=torch)")

    check_flip(flip)
    if train:
        steps = [v2.RandomResizedCrop(image_size, antialias=True)] + ([v2.RandomHorizontalFlip()] if flip else [])
        if color_jitter:
            steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        steps = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)]
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def strong_color_augment(images, strong: StrongAugment, generator=None):
    """StrongAugment's colour steps on float [B, C, H, W] images in [0, 1] (C = 1 or 3), each image drawing its own:
    ColorJitter (torchvision's: factors U[1 - j, 1 + j] for brightness, contrast and saturation, a hue shift
    U[-j, j], the four applied in a random order), RandomGrayscale, then the Gaussian blur."""
    batch = len(images)

    def chosen(probability):
        return torch.rand(batch, generator=generator) < probability

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator)

    brightness, contrast, saturation, hue = strong.jitter
    factors = [uniform(max(0.0, 1 - brightness), 1 + brightness), uniform(max(0.0, 1 - contrast), 1 + contrast),
               uniform(max(0.0, 1 - saturation), 1 + saturation), uniform(-hue, hue)]
    order = torch.argsort(torch.rand(batch, 4, generator=generator), dim=1)  # torchvision's randperm(4) per image
    jittered = chosen(strong.jitter_p)
    for position in range(4):
        for step in range(4):
            rows = jittered & (order[:, position] == step)
            if rows.any():
                images[rows] = _COLOR_STEPS[step](images[rows], factors[step][rows].view(-1, 1, 1, 1))
    grey = chosen(strong.grayscale_p)
    if images.shape[1] == 3 and grey.any():
        images[grey] = _grayscale(images[grey]).expand_as(images[grey])
    blurred = chosen(strong.blur_p)
    if blurred.any():
        images[blurred] = gaussian_blur(images[blurred], uniform(*strong.blur_sigma)[blurred])
    return images


def _grayscale(images):
    """[B, 1, H, W] luma of RGB images (a one-channel image is its own)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(GRAYSCALE_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _blend(images, other, factor):
    """torchvision's _blend: factor * images + (1 - factor) * other, clamped to [0, 1]."""
    return (factor * images + (1 - factor) * other).clamp(0.0, 1.0)


def _brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor)


def _contrast(images, factor):
    return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(images, factor):
    return images if images.shape[1] == 1 else _blend(images, _grayscale(images), factor)


def _hue(images, shift):
    """Rotates the hue of RGB images by `shift` turns (HSV round trip); a one-channel image is unchanged."""
    if images.shape[1] == 1:
        return images
    value, _ = images.max(1)
    spread = value - images.min(1)[0]
    safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    red, green, blue = images.unbind(1)
    hue = torch.where(value == red, (green - blue) / safe_spread,
                      torch.where(value == green, (blue - red) / safe_spread + 2, (red - green) / safe_spread + 4))
    hue = torch.where(spread > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)).remainder(1.0)
    saturation = torch.where(value > 0, spread / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    sector = hue * 6
    whole = sector.floor()
    fraction = sector - whole
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = torch.stack([value, p, q, t], 1)  # which of v, p, q, t each channel takes, per sector 0..5
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=images.device)
    picks = table[:, whole.long().remainder(6)].transpose(0, 1)  # [B, 3, H, W]
    return choices.gather(1, picks).clamp(0.0, 1.0)


_COLOR_STEPS = (_brightness, _contrast, _saturation, lambda images, shift: _hue(images, shift.view(-1)))


def gaussian_blur(images, sigma):
    """Each image of [B, C, H, W] blurred by a Gaussian of its own standard deviation `sigma` [B] (Pillow's
    GaussianBlur(radius=sigma), as the official views; edge pixels extended), separable, 3 sigma each side."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-0.5 * (offsets / sigma.to(images).view(-1, 1)) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)  # [B, 2 radius + 1]
    batch, channels, height, width = images.shape
    weights = kernels.repeat_interleave(channels, 0)  # one kernel per (image, channel)
    rows = F.pad(images.reshape(1, batch * channels, height, width), (radius, radius, radius, radius),
                 mode="replicate")
    rows = F.conv2d(rows, weights.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    blurred = F.conv2d(rows, weights.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return blurred.view(batch, channels, height, width)


class PillowGaussianBlur:
    """The official views' GaussianBlur on a PIL image: ImageFilter.GaussianBlur(radius ~ U(*sigma)), the radius
    drawn from torch's generator (seeded per DataLoader worker)."""

    def __init__(self, sigma: Tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image):
        from PIL import ImageFilter

        low, high = self.sigma
        return image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * torch.rand(()).item()))


def jpeg_view_transform(mean, std, strong: StrongAugment, image_size=224, flip=True):
    """SADE's test-time view of a PIL image (the official ImageNet-LT / Places-LT / iNat views)."""
    v2 = import_optional("torchvision.transforms.v2", "SADE's test-time views of JPEG list files")

    check_flip(flip)
    steps = [v2.RandomResizedCrop(image_size, scale=strong.crop_scale, antialias=True),
             v2.RandomApply([v2.ColorJitter(*strong.jitter)], p=strong.jitter_p),
             v2.RandomGrayscale(strong.grayscale_p),
             v2.RandomApply([PillowGaussianBlur(strong.blur_sigma)], p=strong.blur_p)]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
