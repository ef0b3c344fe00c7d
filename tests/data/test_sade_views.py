"""SADE's test-time views (fastlt.data.transforms.StrongAugment, SADE_VIEWS): the batched colour steps equal
torchvision's ColorJitter / RandomGrayscale maths image by image, the blur is Pillow's GaussianBlur, the steps happen
as often as the official probabilities say, and the loaders apply the view (with no rotation or training jitter)."""

import numpy as np
import pytest
import torch

from fastlt.data import ListFileDataset, make_loader
from fastlt.data.base import ArrayDataset
from fastlt.data.transforms import (_COLOR_STEPS, SADE_VIEWS, ArrayBatchAugment, StrongAugment, _grayscale,
                                    gaussian_blur, jpeg_view_transform, strong_color_augment)

functional = pytest.importorskip("torchvision.transforms.v2.functional")


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("step, reference, low, high", [
    (0, functional.adjust_brightness, 0.6, 1.4),
    (1, functional.adjust_contrast, 0.6, 1.4),
    (2, functional.adjust_saturation, 0.6, 1.4),
    (3, functional.adjust_hue, -0.1, 0.1),
], ids=["brightness", "contrast", "saturation", "hue"])
def test_each_colour_step_is_torchvisions_image_by_image(channels, step, reference, low, high):
    generator = torch.Generator().manual_seed(step)
    images = torch.rand(6, channels, 9, 7, generator=generator)
    images[0] = images[0, :1]  # a grey pixel field: hue and saturation are undefined there
    factors = low + (high - low) * torch.rand(6, generator=generator)
    ours = _COLOR_STEPS[step](images.clone(), factors.view(-1, 1, 1, 1))
    for image, factor, actual in zip(images, factors.tolist(), ours):
        torch.testing.assert_close(actual, reference(image, factor), atol=2e-6, rtol=0)
    if channels == 1 and step >= 2:
        assert torch.equal(ours, images)  # a grey image has no saturation or hue, as in torchvision


def test_grayscale_is_torchvisions():
    images = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(_grayscale(images), functional.rgb_to_grayscale(images), atol=1e-7, rtol=0)


def test_blur_is_pillows_gaussian_blur():
    image_module = pytest.importorskip("PIL.Image")
    from PIL import ImageFilter

    pixels = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round()
    pil = image_module.fromarray(pixels[0].permute(1, 2, 0).byte().numpy())
    for sigma in (0.5, 1.0, 2.0):
        official = torch.from_numpy(np.array(pil.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(2, 0, 1)
        ours = gaussian_blur(pixels.clone(), torch.tensor([sigma]))[0]
        inner = (slice(None), slice(6, -6), slice(6, -6))  # Pillow's box-blur edges differ by a few levels
        assert (ours - official.float())[inner].abs().mean() < 1.0  # of 0..255
        assert (pixels[0] - official.float())[inner].abs().mean() > 20  # while the blur itself moves pixels by more


def test_each_image_draws_its_own_steps_at_the_official_rates():
    strong = SADE_VIEWS["cifar"]
    images = torch.rand(4000, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    out = strong_color_augment(images.clone(), strong, torch.Generator().manual_seed(2))
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(grey.float().mean() - strong.grayscale_p) < 0.02
    untouched = (out == images).flatten(1).all(1)  # neither jittered, greyed nor blurred
    expected = (1 - strong.jitter_p) * (1 - strong.grayscale_p) * (1 - strong.blur_p)
    assert abs(untouched.float().mean() - expected) < 0.02
    assert out.min() >= 0 and out.max() <= 1


class RedSquares(ArrayDataset):
    """32 x 32 RGB images of one saturated colour (uint8, HWC), two classes, no normalisation."""

    def __init__(self, size=256):
        self.images = np.zeros((size, 32, 32, 3), dtype=np.uint8)
        self.images[..., 0] = 200
        self.images[..., 1:] = 40
        self.targets = np.arange(size) % 2
        self.num_classes, self.train_class_counts = 2, np.bincount(self.targets)
        self.normalization = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_the_view_loader_greys_about_a_fifth_of_the_images_and_never_rotates():
    dataset = RedSquares()
    loader = make_loader(dataset, 256, train=True, loader="torch", num_workers=0, rotation=15,
                         strong=SADE_VIEWS["cifar"], seed=0)
    images, _ = next(iter(loader))
    pixels = images * 255
    grey = (pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-3
    assert 0.1 < grey.float().mean() < 0.3  # RandomGrayscale(0.2); no training view ever greys a red square
    plain = make_loader(dataset, 256, train=True, loader="torch", num_workers=0, flip=False, pad=0,
                        strong=StrongAugment(blur_p=0.0, jitter_p=0.0, grayscale_p=0.0), rotation=15)
    untouched, _ = next(iter(plain))
    expected = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(untouched * 255, expected, atol=1e-4, rtol=0)  # no rotation, no crop, no colour


def test_the_array_augment_applies_the_view_after_the_crop():
    augment = ArrayBatchAugment(True, (0.0,), (1.0,), pad=4, flip=False, strong=SADE_VIEWS["cifar"],
                                generator=torch.Generator().manual_seed(0))
    out = augment(torch.full((64, 1, 28, 28), 128, dtype=torch.uint8))
    assert out.shape == (64, 1, 28, 28)
    assert (out.flatten(1).std(1) > 0).float().mean() > 0.5  # cropped borders, blurred, brightness / contrast
    assert len(torch.unique(out.flatten(1).mean(1).round(decimals=3))) > 20  # each image its own jitter


def test_the_jpeg_view_is_the_official_transform():
    transform = jpeg_view_transform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), SADE_VIEWS["inaturalist"], image_size=64)
    crop, jitter, grey, blur = transform.transforms[:4]
    assert crop.scale == (0.08, 1.0) and jitter.p == 0.8 and grey.p == 0.2 and blur.p == 0.5
    assert SADE_VIEWS["imagenet"].crop_scale == (0.2, 1.0) and SADE_VIEWS["cifar"].blur_p == 0.2
    image_module = pytest.importorskip("PIL.Image")
    image = image_module.fromarray(np.full((80, 90, 3), 120, dtype=np.uint8))
    assert transform(image).shape == (3, 64, 64)


def test_the_jpeg_view_loader_greys_about_a_fifth_of_the_images(jpeg_tree):
    root, list_file, counts = jpeg_tree
    dataset = ListFileDataset(root, list_file)
    loader = make_loader(dataset, len(dataset), train=True, loader="torch", num_workers=0, image_size=24,
                         color_jitter=0.4, strong=SADE_VIEWS["imagenet"], mean=(0.0,) * 3, std=(1.0,) * 3)
    images, _ = next(iter(loader))
    assert images.shape == (sum(counts), 3, 24, 24)
    greyed = ((images[:, 0] - images[:, 1]).abs().amax((1, 2)) < 1e-6).float().mean()
    assert 0.05 < greyed < 0.4  # RandomGrayscale(0.2) of 80 random-colour images


def test_dali_refuses_the_views():
    with pytest.raises(ValueError, match="torch loader"):
        make_loader(RedSquares(8), 4, train=True, loader="dali", strong=SADE_VIEWS["cifar"])
