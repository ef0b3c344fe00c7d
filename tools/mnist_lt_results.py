"""MNIST-LT results table: every method, several training seeds, mean +- std, written to RESULTS.md.

    python tools/mnist_lt_results.py                       # 3 seeds x 30 epochs, 2 seeds at a time
    python tools/mnist_lt_results.py --seeds 0 --epochs 2  # a quick look

Data: MNIST-LT n_max 500, ratio 100 (1,236 training images, one fixed LT subset), the balanced val split of 20
images per digit drawn outside the LT subset (model selection, tau), the 10k MNIST test set (reported only). The
seed changes initialisation and sampling order. Stage 1 uses the packaged mnist_lt_* recipes with the schedule
scaled to --epochs; cRT / LWS / tau-norm / NCM all start from that seed's CE model; the RIDE distillation student
learns from that seed's 6-expert RIDE teacher. Per-seed summaries are cached
in <out>/seed<k>/summary.json, so an interrupted run continues where it stopped.
"""

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

STAGE1 = [("CE", "mnist_lt_ce"), ("LDAM-DRW", "mnist_lt_ldam_drw"), ("Balanced Softmax", "mnist_lt_balanced_softmax"),
          ("RIDE (3 experts)", "mnist_lt_ride_router"), ("ResLT", "mnist_lt_reslt")]
DECOUPLED = [("cRT", "mnist_lt_crt"), ("tau-norm", "mnist_lt_tau"), ("LWS", "mnist_lt_lws"), ("NCM", "mnist_lt_ncm")]
ROUTED = "RIDE (3 experts) + router"
TEACHER, DISTILLED = "RIDE teacher (6 experts)", "RIDE (3 experts) + distillation"
ORDER = ["CE", "LDAM-DRW", "Balanced Softmax", "RIDE (3 experts)", ROUTED, TEACHER, DISTILLED, "ResLT", "cRT",
         "tau-norm", "LWS", "NCM"]
COLUMNS = ("overall", "many", "medium", "few")


def overrides(seed: int, epochs: int, out: str) -> list:
    """The recipes' schedule (warmup 2, x0.1 at 80% and 90%) and DRW start (80%) scaled to `epochs`."""
    late = [max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))]
    return [f"seed={seed}", f"out={out}", f"train.epochs={epochs}", f"train.schedule.milestones={late}",
            f"train.schedule.warmup_epochs={min(2, epochs)}", f"method.drw_epoch={late[0]}"]


def scores(results: dict) -> dict:
    return {column: float(results[column]) for column in COLUMNS}


def run_seed(seed: int, epochs: int, root: str) -> dict:
    """Trains every method for one seed (one intra-op thread: tiny models on a shared machine)."""
    import torch

    from fastlt.methods import load_config, load_stage1, run_stage2, train
    from fastlt.methods.builders import pick_device

    torch.set_num_threads(1)
    folder = os.path.join(root, f"seed{seed}")
    cached = os.path.join(folder, "summary.json")
    if os.path.exists(cached):
        with open(cached) as handle:
            return json.load(handle)
    started, summary, extras = time.time(), {}, {}
    for label, recipe in STAGE1:
        out = os.path.join(folder, recipe)
        config = load_config(recipe, overrides(seed, epochs, out))
        result = train(config, progress_bar=False, verbose=False)
        summary[label] = scores(result["stage1"])
        if "stage2" in result:  # the RIDE recipe's router
            summary[ROUTED] = scores(result["stage2"])
            extras["router"] = {key: result["stage2"]["chosen"][key] for key in
                                ("share_per_num_experts", "mean_experts", "mflops_routed", "mflops_all_experts")}
        print(f"seed {seed}: {label} done ({time.time() - started:.0f} s)", flush=True)
    teacher_folder = os.path.join(folder, "mnist_lt_ride_teacher")
    for label, recipe, extra in ((TEACHER, "mnist_lt_ride_teacher", []),
                                 (DISTILLED, "mnist_lt_ride_distill", [f"method.teacher={teacher_folder}"])):
        config = load_config(recipe, overrides(seed, epochs, os.path.join(folder, recipe)) + extra)
        summary[label] = scores(train(config, progress_bar=False, verbose=False)["stage1"])
        print(f"seed {seed}: {label} done ({time.time() - started:.0f} s)", flush=True)
    ce_folder = os.path.join(folder, "mnist_lt_ce")
    for label, recipe in DECOUPLED:
        config = load_config(recipe, overrides(seed, epochs, ce_folder))
        _, datasets, model = load_stage1(ce_folder)
        result = run_stage2(config, model, datasets, device=pick_device(), progress_bar=False, verbose=False)
        summary[label] = scores(result)
        if label == "tau-norm":
            extras["tau"] = result["chosen"]["tau"]
        print(f"seed {seed}: {label} done ({time.time() - started:.0f} s)", flush=True)
    record = {"seed": seed, "epochs": epochs, "rows": summary, "extras": extras, "seconds": time.time() - started}
    with open(cached, "w") as handle:
        json.dump(record, handle, indent=2)
    return record


NOTES = """Reading (for the 3-seed, 30-epoch table above; the checks above are recomputed on every run):

- Yes for the claim the issue asks about: RIDE (with and without the router or distillation) and all four
  decoupled classifiers are far above CE on the few-shot digits (CE's few-shot accuracy is low because its
  classifier is biased towards the 500-image digits), and the re-balancing costs the many-shot digits little.
- The finer orderings are not the papers'. The decoupled classifiers (cRT, tau-norm, LWS, NCM) land below the
  re-balanced losses (LDAM-DRW, Balanced Softmax), while on CIFAR-100-LT cRT / tau-norm (43.3 / 43.2) are above
  LDAM-DRW (42.0), and LWS is the weakest of the four here while it is the best on ImageNet-LT (49.9). Likely
  reasons: MNIST's features are nearly linearly separable, so re-balancing the loss from the start is enough and
  costs the representation nothing; the few-shot classes have 5-13 images, so the class-aware stage 2 sees each
  tail image dozens of times (cRT / LWS can overfit them, and a 10-epoch LWS on ~19 steps per epoch moves the
  scales only a little); with 10 classes one tau or one scale per class is a very coarse correction.
- RIDE is the best 3-expert method, but only about 1 point above LDAM-DRW (its own single-expert loss), less than
  the ~6 points of the paper on CIFAR-100-LT: with 10 easy classes there is little left for extra experts to fix.
  For the same reason distillation does not help here: the 6-expert teacher is within a few tenths of the
  3-expert model (the paper's teacher is 1.6 points above its student on CIFAR-100-LT), so the student has
  nothing to learn from it, and its accuracy stays within the seed spread of plain RIDE.
- The router stops after the first expert for about 95% of the test images (one expert is already about as good
  as the ensemble here), so routed RIDE keeps the accuracy at about 37% of the all-experts compute; the RIDE README
  warns that "different runs will result in different EA modules", and the share per seed is in each seed's
  summary.json.
- Every method trains the recipes' 30 epochs (DRW from epoch 24), with the pad-4 random crop and no flip; the
  whole table takes about 15 minutes with three seeds side by side on this 2-core machine.
"""


def mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {spread:.1f}"


def orderings(records) -> list:
    """The papers' claims checked on the seed means: few-shot accuracy above CE."""
    few = {label: np.mean([record["rows"][label]["few"] for record in records]) for label in ORDER}
    lines = []
    for label in ("RIDE (3 experts)", ROUTED, DISTILLED, "cRT", "tau-norm", "LWS", "NCM"):
        verdict = "holds" if few[label] > few["CE"] else "does NOT hold"
        lines.append(f"- {label} above CE on few-shot: {verdict} ({few[label]:.1f} vs {few['CE']:.1f}).")
    return lines


def write_markdown(records, path: str, command: str) -> None:
    epochs = records[0]["epochs"]
    minutes = ", ".join(f"{record['seconds'] / 60:.1f}" for record in records)
    seeds = [record["seed"] for record in records]
    lines = [
        "# MNIST-LT results", "",
        f"Regenerate with: `{command}`", "",
        f"MNIST-LT (n_max 500, ratio 100: 500, 299, 179, 107, 64, 38, 23, 13, 8, 5 training images per digit; "
        f"many = digits 0-3, medium = 4-6, few = 7-9), one fixed LT subset; evaluated on the 10k MNIST test set. "
        f"Model selection (best epoch) and tau on the balanced val split (20 images per digit drawn from MNIST "
        f"training images outside the LT subset); never on test. Seeds {seeds} (initialisation and sampling "
        f"order); mean ± sample std over seeds, accuracies in %. Split accuracies are means of per-class "
        f"accuracies.", "",
        f"Setup: small CNN (3 conv blocks, 32/64/128 channels; RIDE: shared first block, 3 experts owning blocks "
        f"2-3 at 3/4 width, cosine classifier x 30; ResLT: 3 BN branches, shared linear), {epochs} epochs, batch 64, "
        f"SGD lr 0.05 Nesterov, wd 5e-4, warmup 2 then x0.1 at 80% and 90% of training, DRW (LDAM-DRW, RIDE) from "
        f"80%, pad-4 random crop without flip; decoupled classifiers on each seed's CE model: cRT / LWS 10 epochs, "
        f"class-aware sampler 4 per class, lr 0.2, start-of-epoch cosine, BN statistics updating; RIDE router 5 "
        f"epochs, pos_weight 100, threshold 0.5; RIDE distillation from the same seed's 6-expert RIDE teacher, T_d "
        f"1.5, both terms x E as in the official code, teacher in train mode. One intra-op thread per seed; training "
        f"and evaluating all methods took {minutes} min per seed (seeds side by side, --jobs) on "
        f"{platform.machine()} ({os.cpu_count()} cores, shared with other jobs).", "",
        "| method | overall | many | medium | few |", "|---|---:|---:|---:|---:|"]
    for label in ORDER:
        cells = [mean_std([record["rows"][label][column] for record in records]) for column in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    taus = [round(record["extras"]["tau"], 2) for record in records]
    router = [record["extras"]["router"] for record in records]
    shares = {k: np.mean([r["share_per_num_experts"][k] for r in router]) for k in router[0]["share_per_num_experts"]}
    lines += ["", f"tau picked on val per seed: {taus}.", "",
              "RIDE router on test (mean over seeds): samples stopping after 1 / 2 / 3 experts: " +
              " / ".join(f"{100 * share:.1f}%" for share in shares.values()) +
              f"; {np.mean([r['mflops_routed'] for r in router]):.2f} MFLOPs (MACs) per image routed vs "
              f"{router[0]['mflops_all_experts']:.2f} with all experts.", "",
              "## Do the papers' orderings hold?", ""] + orderings(records) + ["", NOTES]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2, help="seeds trained at the same time (one thread each)")
    parser.add_argument("--out", default="runs/mnist_lt_results")
    parser.add_argument("--markdown", default="RESULTS.md")
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        records = list(pool.map(run_seed, args.seeds, [args.epochs] * len(args.seeds), [args.out] * len(args.seeds)))
    command = "python " + " ".join(["tools/mnist_lt_results.py"] + (argv if argv is not None else sys.argv[1:]))
    write_markdown(records, args.markdown, command)
    print(open(args.markdown).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
