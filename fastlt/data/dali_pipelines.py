"""The DALI pipeline graphs (imported only when a DALI loader is built: `import nvidia.dali` takes ~0.5 s)."""

import torch
from nvidia.dali import fn, pipeline_def, types

from fastlt.data.transforms import check_flip


def _gpu_id():
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _normalize(images, mean, std, channels_last, **crop):
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        mean=[255.0 * value for value in mean], std=[255.0 * value for value in std], **crop)


def _mirror(flip):
    """crop_mirror_normalize's `mirror` argument: a coin flip per sample, or none at all with `flip=False`."""
    return {"mirror": fn.random.coin_flip()} if flip else {}


def array_pipeline(source, batch_size, num_threads, seed, train, mean, std, image_shape, pad=4, rotation=0.0,
                   channels_last=False, flip=True):
    """uint8 HWC arrays: pad-`pad` random crop + flip (if `flip`; + rotation in [-rotation, rotation]) if
    `train`, normalise, CHW (or HWC when `channels_last`) float32."""
    device_id = _gpu_id()
    check_flip(flip)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_dynamic=True)
    def pipeline():
        images, labels = fn.external_source(source=source, num_outputs=2, batch=True, layout=["HWC", ""],
                                            dtype=[types.UINT8, types.INT64])
        if device_id is not None:
            images = images.gpu()
        if not train:
            return _normalize(images, mean, std, channels_last), labels
        if pad:
            offsets = [float(value) for value in range(-pad, pad + 1)]
            anchor = fn.random.uniform(values=offsets, shape=[2])
            images = fn.slice(images, anchor, [float(size) for size in image_shape], axis_names="HW",
                              out_of_bounds_policy="pad", fill_values=0, normalized_anchor=False,
                              normalized_shape=False)
        if rotation:
            images = fn.rotate(images, angle=fn.random.uniform(range=(-rotation, rotation)), keep_size=True,
                               fill_value=0, interp_type=types.INTERP_NN)
        return _normalize(images, mean, std, channels_last, **_mirror(flip)), labels

    return pipeline()


def jpeg_pipeline(source, batch_size, num_threads, seed, train, mean, std, image_size=224, resize_size=256,
                  color_jitter=0.0, channels_last=False, flip=True):
    """Encoded images: train = random-resized-crop decode + resize `image_size` + flip (if `flip`; + color
    jitter), test = decode + resize shorter side to `resize_size` + center crop `image_size`; normalise."""
    device_id = _gpu_id()
    check_flip(flip)
    decoder_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_dynamic=True)
    def pipeline():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.INT64])
        if not train:
            images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=resize_size, antialias=True)
            return _normalize(images, mean, std, channels_last, crop=(image_size, image_size)), labels
        # decoding only the random crop window is DALI's fast path for RandomResizedCrop
        images = fn.decoders.image_random_crop(encoded, device=decoder_device, output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, size=[image_size, image_size], antialias=True)
        if color_jitter:
            def factor():
                return fn.random.uniform(range=(1 - color_jitter, 1 + color_jitter))

            images = fn.color_twist(images, brightness=factor(), contrast=factor(), saturation=factor())
        return _normalize(images, mean, std, channels_last, **_mirror(flip)), labels

    return pipeline()
