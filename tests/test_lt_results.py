"""tools/lt_results.py without training: each benchmark owns one section of the markdown file, a partial run keeps
the rows and the hand-written reading it did not produce, the papers' orderings and the variant rows are checked on
the seed means, and the recipes' schedule is scaled to --epochs (DRW only where the recipe has it)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import lt_results  # noqa: E402


def record(seed, rows, extras=None):
    keys = [key for key, row in lt_results.ROWS.items() if set(row.labels) & set(rows)]
    return {"seed": seed, "epochs": 30, "rows": rows, "extras": extras or {},
            "seconds": {key: 60.0 for key in keys}, "cpu_seconds": {key: 120.0 for key in keys}}


def scores(overall, few):
    return {"overall": overall, "many": 90.0, "medium": 80.0, "few": few}


def test_each_benchmark_rewrites_only_its_own_section(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    mnist = [record(seed, {"CE": scores(80.0 + seed, 50.0), lt_results.RIDE: scores(96.0, 93.0)}) for seed in (0, 1)]
    lt_results.write_markdown("mnist_lt", mnist, path, "python tools/lt_results.py mnist_lt", ["ce", "ride"],
                              (1.0, 2.0))
    with open(path, "a") as handle:
        handle.write("\nReading (hand-written): RIDE wins here.\n")
    fmnist = [record(seed, {"CE": scores(70.0, 20.0 + seed)}) for seed in (0, 1, 2)]
    lt_results.write_markdown("fmnist_lt", fmnist, path, "python tools/lt_results.py fmnist_lt", ["ce"], (3.0, 4.0))
    text = pathlib.Path(path).read_text()
    assert text.index("# MNIST-LT results") < text.index("Reading (hand-written)") < text.index(
        "# Fashion-MNIST-LT results")
    assert "| CE | 80.5 ± 0.7 | 90.0 ± 0.0 | 80.0 ± 0.0 | 50.0 ± 0.0 |" in text  # MNIST-LT, 2 seeds
    assert "| CE | 70.0 ± 0.0 | 90.0 ± 0.0 | 80.0 ± 0.0 | 21.0 ± 1.0 |" in text  # Fashion-MNIST-LT, 3 seeds
    assert "n_max 1000, ratio 100: 1000, 599, 359, 215, 129, 77, 46, 27, 16, 10 training images" in text
    assert "many = classes 0-4, medium = classes 5-7, few = classes 8-9" in text
    assert "(20 images per class drawn" in text and "(50 images per class drawn" in text  # MNISTLT's default, recipe
    assert "1.0 min per seed (wall clock" in text and "2.0, 2.0, 2.0 CPU min per seed" in text

    # a partial MNIST-LT run: the CE row and the reading are kept, the Fashion-MNIST-LT section is untouched
    bf16 = "RIDE (3 experts), bf16 autocast"
    partial = [record(seed, {lt_results.RIDE: scores(96.0 + seed, 93.0), bf16: scores(95.0 + 0.2 * seed, 92.0)})
               for seed in (0, 1)]
    lt_results.write_markdown("mnist_lt", partial, path, "python tools/lt_results.py mnist_lt --methods ride_bf16",
                              ["ride_bf16"], (1.0, 1.0))
    updated = pathlib.Path(path).read_text()
    mnist_section = updated[:updated.index("# Fashion-MNIST-LT results")]
    assert updated[updated.index("# Fashion-MNIST-LT results"):] == text[text.index("# Fashion-MNIST-LT results"):]
    assert "| CE | 80.5 ± 0.7 |" in mnist_section and "Rows kept from the previous table" in mnist_section
    assert "Reading (hand-written): RIDE wins here." in mnist_section
    assert "- RIDE (3 experts) above CE on few: holds (93.0 vs 50.0)." in mnist_section
    # |95.1 - 96.5| = 1.4 > 0.1 + 0.7: outside seed noise
    assert (f"- {bf16} vs RIDE (3 experts) on overall: -1.4 (95.1 vs 96.5), NOT within seed noise (stds 0.1 + 0.7)."
            in mnist_section)
    assert f"{bf16}: mnist_lt_ride with `train.precision=bf16`." in mnist_section
    assert "BalPoE (3 experts) + mixup: mnist_lt_balpoe_mixup (train.mixup {'mixup_alpha': 0.4})." in mnist_section


def test_orderings_compare_seed_means():
    stats = {"CE": {"few": (50.0, 1.0), "overall": (80.0, 1.0)}, "cRT": {"few": (49.0, 1.0), "overall": (85.0, 1.0)},
             "LDAM-DRW": {"overall": (85.0, 0.5), "few": (80.0, 1.0)}}
    lines = lt_results.orderings(stats)
    assert lines == ["- cRT above CE on few: does NOT hold (49.0 vs 50.0).",
                     "- cRT at least LDAM-DRW on overall: holds (85.0 vs 85.0)."]
    bf16 = "RIDE (3 experts), bf16 autocast"
    assert lt_results.orderings({lt_results.RIDE: {"overall": (82.4, 0.4)}, bf16: {"overall": (82.7, 0.3)}}) == [
        f"- {bf16} vs RIDE (3 experts) on overall: +0.3 (82.7 vs 82.4), within seed noise (stds 0.3 + 0.4)."]
    assert lt_results.orderings({lt_results.RIDE: {"overall": (82.4, 0.0)}, bf16: {"overall": (82.7, 0.0)}}) == [
        f"- {bf16} vs RIDE (3 experts) on overall: +0.3 (82.7 vs 82.4), no seed spread to judge it by."]


def test_recipe_overrides_scale_the_schedule_and_drw_only_where_the_recipe_has_it():
    ride = lt_results.recipe_overrides("fmnist_lt_ride", 2, 10, "runs/x", ["train.precision=bf16"])
    assert ride == ["seed=2", "out=runs/x", "train.epochs=10", "train.schedule.milestones=[8, 9]",
                    "train.schedule.warmup_epochs=2", "method.drw_epoch=8", "train.precision=bf16"]
    assert not any(item.startswith("method.") for item in lt_results.recipe_overrides("fmnist_lt_ce", 0, 30, "x"))


def test_every_row_trains_a_packaged_recipe_of_each_benchmark():
    from fastlt.methods import load_config

    for prefix in lt_results.BENCHMARKS:
        for key, row in lt_results.ROWS.items():
            recipe = f"{prefix}_{row.recipe}"
            config = load_config(recipe, lt_results.recipe_overrides(recipe, 0, 30, "runs/x", row.overrides))
            assert config["name"] == recipe, key
            assert (config.get("stage2") is not None) == (len(row.labels) > 1 or row.on_ce), key
