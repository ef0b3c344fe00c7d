"""A run folder: the resolved config (config.yaml), one JSON line per logged record (metrics.jsonl), a tqdm
progress bar and, optionally, TensorBoard scalars. Only the main rank writes; other ranks get no-ops.

JSON files are written as JSON (`json_ready`, `write_json`): a missing value such as an empty shot group's accuracy
(NaN in memory) is `null`, never Python's bare `NaN`, which JSON readers refuse.

Usage::

    run = RunFolder("runs/ce_mnist", config={"model": "small_cnn", "lr": 0.1})
    for images, targets in run.progress(loader, desc="epoch 0"):
        ...
    run.log({"epoch": 0, "train_loss": 0.52})
"""

import json
import math
import os
import time
from typing import Iterable, Optional

import numpy as np
import torch
import yaml
from tqdm import tqdm

from fastlt.progress import progress_bar


class RunFolder:
    def __init__(self, root: str, config: Optional[dict] = None, *, is_main: bool = True, tensorboard: bool = False,
                 progress_bar: bool = True):
        self.root = root
        self.is_main = is_main
        self.progress_bar = progress_bar
        self.start_time = time.time()
        self.tensorboard = None
        if not is_main:
            return
        os.makedirs(root, exist_ok=True)
        if config is not None:
            with open(self.path("config.yaml"), "w") as handle:
                yaml.safe_dump(plain(config), handle, sort_keys=False)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "RunFolder: tensorboard=True needs the tensorboard package (pip install tensorboard)"
                ) from error
            self.tensorboard = SummaryWriter(self.path("tensorboard"))

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def log(self, record: dict) -> None:
        """Appends `record` plus elapsed seconds to metrics.jsonl; numeric values also go to TensorBoard at
        record["step"] (or record["epoch"])."""
        if not self.is_main:
            return
        record = {**json_ready(record), "elapsed_s": round(time.time() - self.start_time, 3)}
        with open(self.path("metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            step = record.get("step", record.get("epoch", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def drop_epoch_records(self, first_epoch: int) -> None:
        """Rewrites metrics.jsonl without the records of epochs >= first_epoch and without a line cut short by a
        crash: a resumed run re-trains those epochs and logs them again, so the log matches the checkpoint."""
        path = self.path("metrics.jsonl")
        if not self.is_main or not os.path.exists(path):
            return
        kept = []
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if not isinstance(record.get("epoch"), int) or record["epoch"] < first_epoch:
                    kept.append(line if line.endswith("\n") else line + "\n")
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def progress(self, iterable: Iterable, desc: str = "", total: Optional[int] = None) -> tqdm:
        """A tqdm bar on the main rank (`fastlt.progress`: a line a minute when stderr is not a terminal;
        progress_bar=False turns it off)."""
        return progress_bar(iterable, desc, total, enabled=self.is_main and self.progress_bar)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plain(value):
    """Tuples, NumPy and torch scalars / arrays turned into the lists, ints and floats YAML and JSON accept."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return plain(value.tolist())
    return value


def json_ready(value):
    """`plain(value)` with every NaN or infinite float as None (JSON's null): no missing value is written as NaN."""
    value = plain(value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: str, value) -> None:
    """`value` as an indented JSON file (through `json_ready`)."""
    with open(path, "w") as handle:
        json.dump(json_ready(value), handle, indent=2, allow_nan=False)
