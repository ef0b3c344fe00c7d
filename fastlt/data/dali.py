"""DALI pipelines fed in fastlt's sampler order (DALI readers cannot do class-balanced sampling).

The sample order of each epoch comes from a `LongTailSampler` as a numpy array and enters the pipeline through
`fn.external_source` in batches; the outputs leave through `DALIGenericIterator` as torch tensors, one epoch
being exactly this rank's share of the sampler. Without a GPU the pipeline is CPU-only (`device_id=None`,
`device="cpu"` decoding); with one, JPEGs are decoded with `device="mixed"` and augmented on the GPU.
"""

import collections
import functools
import importlib.util
import io
import warnings

import numpy as np

from fastlt._optional import install_hint
from fastlt.errors import DataError, MissingDependencyError


def dali_available():
    """Whether NVIDIA DALI is installed (checked without importing it); else the torch path is used."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


class _OrderedSource:
    """external_source callback: the next batch of this epoch's indices, then StopIteration.

    It keeps the last few batches' indices so that a decode error inside DALI can be traced to a file.
    """

    def __init__(self, dataset, batch_size):
        self.dataset = dataset
        self.batch_size = batch_size
        self.indices = np.zeros(0, dtype=np.int64)
        self.position = 0
        self.recent = collections.deque(maxlen=4)
        self.skipped = 0
        self.skipped_batches = 0

    def start(self, indices):
        self.indices, self.position = indices, 0
        self.recent.clear()

    def __call__(self):
        if self.position >= len(self.indices):
            raise StopIteration
        batch = self.indices[self.position: self.position + self.batch_size]
        self.position += len(batch)
        self.recent.append(batch)
        return self.fetch(batch)


class _ArraySource(_OrderedSource):
    def fetch(self, batch):
        images = self.dataset.images[batch]
        if images.ndim == 3:
            images = images[..., None]
        return images, self.dataset.targets[batch].reshape(-1, 1)


class _FileSource(_OrderedSource):
    def fetch(self, batch):
        encoded, labels = [], []
        for index in batch.tolist():
            data = self.dataset.read_bytes(index)
            if data is not None and self.dataset.skip_corrupt and not _looks_decodable(data):
                warnings.warn(f"skipping undecodable image {self.dataset.paths[index]}", RuntimeWarning, stacklevel=2)
                data = None
            if data is None:
                self.skipped += 1
                continue
            encoded.append(data)
            labels.append(np.array([self.dataset.targets[index]], dtype=np.int64))
        if not encoded:  # every file of this batch was skipped
            self.skipped_batches += 1
            return self()
        return encoded, labels

    def explain(self, error):
        """A decode error naming the first file of the recent batches that PIL cannot decode either."""
        from PIL import Image

        for batch in self.recent:
            for index in batch.tolist():
                path = self.dataset.paths[index]
                try:
                    with Image.open(path) as image:
                        image.load()
                except (OSError, SyntaxError, ValueError) as decode_error:
                    return DataError(f"cannot decode image {path}: {decode_error}")
        return error


def _looks_decodable(data):
    """Pillow's verify(), which reads a JPEG's headers only; a JPEG that does not end with its end-of-image marker
    (cut short: verify passes it, DALI's decoder fails) is decoded in full to decide."""
    from PIL import Image

    encoded = data.tobytes()
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.verify()
        if encoded[:2] == b"\xff\xd8" and encoded[-2:] != b"\xff\xd9":
            with Image.open(io.BytesIO(encoded)) as image:
                image.load()
        return True
    except Exception:  # noqa: BLE001  (PIL raises many types on broken files)
        return False


class DALILoader:
    """Iterable of (float32 images [B, C, H, W], int64 labels [B]) from a DALI pipeline in `sampler` order.

    Build it with `fastlt.data.make_loader(..., loader="dali")`. One pass = this rank's share of the sampler's
    current epoch (call `set_epoch`). With `skip_corrupt=True`, files that cannot be read or that Pillow's
    `verify()` rejects (JPEGs cut short: a full Pillow decode) are dropped before decoding and counted in
    `skipped` (a batch left empty in `skipped_batches`); a file that passes that check but fails in DALI's decoder
    still raises an error naming it (a DALI batch cannot lose a sample mid-pipeline).
    """

    backend = "dali"

    def __init__(self, dataset, sampler, batch_size, train, mean, std, num_threads=2, seed=0, drop_last=False,
                 channels_last=False, **augment):
        if not dali_available():
            raise MissingDependencyError(f"loader='dali' needs NVIDIA DALI, which is not installed: "
                                         f"{install_hint('nvidia.dali')}")
        from fastlt.data.dali_pipelines import array_pipeline, jpeg_pipeline

        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.channels_last = channels_last
        # partial, not a lambda over self: a reference cycle would keep each loader's DALI worker threads alive
        # until the next garbage collection, and forking (DataLoader workers) with many live threads can crash
        if hasattr(dataset, "images"):
            self.source = _ArraySource(dataset, batch_size)
            self._make_pipeline = functools.partial(array_pipeline, self.source, batch_size, num_threads, seed, train,
                                                    mean, std, dataset.images.shape[1:3], channels_last=channels_last,
                                                    **augment)
        else:
            self.source = _FileSource(dataset, batch_size)
            self._make_pipeline = functools.partial(jpeg_pipeline, self.source, batch_size, num_threads, seed, train,
                                                    mean, std, channels_last=channels_last, **augment)
        self._iterator = None
        self._epoch_done = False

    @property
    def skipped(self):
        return self.source.skipped

    @property
    def skipped_batches(self):
        return self.source.skipped_batches

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def __iter__(self):
        indices = self.sampler.iteration_indices()
        if self.drop_last:
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        self.source.start(indices)
        if self._iterator is not None and self._epoch_done:
            self._iterator.reset()
        else:  # first epoch, or the last one was left half-read: its prefetched batches must not leak
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            self._iterator = DALIGenericIterator([self._make_pipeline()], ["images", "labels"], size=-1,
                                                 auto_reset=False, last_batch_policy=LastBatchPolicy.PARTIAL,
                                                 prepare_first_batch=False)
        self._epoch_done = False
        try:
            for (batch,) in self._iterator:
                images = batch["images"]
                if self.channels_last:
                    images = images.permute(0, 3, 1, 2)
                yield images, batch["labels"].view(-1)
        except RuntimeError as error:
            self._iterator = None
            explained = self.source.explain(error) if hasattr(self.source, "explain") else error
            if explained is error:
                raise
            raise explained from error
        self._epoch_done = True
