import json

import numpy as np
import torch
import yaml

from fastlt.engine import RunFolder, read_metrics, write_json


def test_run_folder_writes_resolved_config_and_metrics(tmp_path):
    config = {"model": "ride_resnet32", "schedule": {"milestones": (160, 180), "gamma": 0.01}, "lr": np.float32(0.5)}
    run = RunFolder(str(tmp_path / "run"), config=config)
    run.log({"epoch": 1, "train_loss": torch.tensor(0.25), "per_class": np.array([1.0, 0.5])})
    run.log({"epoch": 2, "train_loss": 0.125})
    with open(run.path("config.yaml")) as handle:
        assert yaml.safe_load(handle) == {"model": "ride_resnet32", "schedule": {"milestones": [160, 180],
                                                                                 "gamma": 0.01}, "lr": 0.5}
    records = read_metrics(run.path("metrics.jsonl"))
    assert [record["epoch"] for record in records] == [1, 2]
    assert records[0]["train_loss"] == 0.25 and records[0]["per_class"] == [1.0, 0.5] and "elapsed_s" in records[0]
    assert list(run.progress(range(3), desc="epoch 1")) == [0, 1, 2]
    assert RunFolder(str(tmp_path / "quiet"), progress_bar=False).progress([1]).disable


def test_non_main_ranks_write_nothing(tmp_path):
    run = RunFolder(str(tmp_path / "run"), config={"a": 1}, is_main=False)
    run.log({"epoch": 1})
    assert not (tmp_path / "run").exists()
    assert list(run.progress([1, 2])) == [1, 2]


def test_drop_epoch_records_keeps_earlier_epochs_and_drops_a_cut_line(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    for epoch in range(3):
        run.log({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    run.log({"note": "no epoch"})
    with open(run.path("metrics.jsonl"), "a") as handle:
        handle.write('{"epoch": 3, "train_lo')  # killed mid-line
    run.drop_epoch_records(2)
    assert [record.get("epoch") for record in read_metrics(run.path("metrics.jsonl"))] == [0, 1, None]
    run.log({"epoch": 2})
    assert [record.get("epoch") for record in read_metrics(run.path("metrics.jsonl"))] == [0, 1, None, 2]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_missing_values_are_null_in_json(tmp_path):
    """NaN marks a missing value (an empty shot group's accuracy); JSON has no NaN, so the files hold null."""
    run = RunFolder(str(tmp_path))
    run.log({"epoch": 0, "val_many": float("nan"), "val_few": np.float32(50.0), "per_class": np.array([np.inf, 1.0])})
    write_json(str(tmp_path / "results.json"), {"many": np.float64("nan"), "per_class": np.array([np.nan, 25.0])})

    def refuse(constant):
        raise AssertionError(f"{constant} written to a JSON file")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record["val_many"] is None and record["val_few"] == 50.0 and record["per_class"] == [None, 1.0]
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results == {"many": None, "per_class": [None, 25.0]}
