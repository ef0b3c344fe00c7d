"""Results tables of fastlt's own benchmarks (MNIST-LT, Fashion-MNIST-LT): every method, several training seeds,
mean +- std, one section of RESULTS.md per benchmark.

    python tools/lt_results.py fmnist_lt --jobs 3                        # every row: 3 seeds x 30 epochs side by side
    python tools/lt_results.py mnist_lt --seeds 0 --epochs 2             # a quick look
    python tools/lt_results.py mnist_lt --methods balpoe sade logit_adjust  # only these rows; the others are kept

The first argument is the recipe prefix: a row trains the packaged recipe <prefix>_<ROWS[key].recipe> (e.g.
fmnist_lt_ride_router) with the schedule (warmup 2, x0.1 at 80% and 90%) and DRW start (80%) scaled to --epochs.
The seed changes initialisation and sampling order; the LT subset is the recipe's (one fixed subset). cRT / LWS /
tau-norm / NCM / post-hoc logit adjustment all start from that seed's CE model; the RIDE distillation student learns
from that seed's 6-expert RIDE teacher. A variant row runs a recipe with extra overrides under its own label and is
checked against its plain row (RIDE with train.precision=bf16; a BalPoE mixup on/off row is one more line in ROWS).

Per-seed results are cached in <out>/seed<k>/summary.json (row by row), so an interrupted run continues where it
stopped. With --methods, only those rows are trained; the others keep their numbers from the existing section. A run
rewrites only its own section of the markdown file (from its `# <title> results` heading to the next top-level
heading) and keeps that section's hand-written reading (from a line starting with "Reading" to the section's end).
"""

import argparse
import functools
import inspect
import json
import os
import platform
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Optional, Tuple

import numpy as np

RIDE, ROUTED = "RIDE (3 experts)", "RIDE (3 experts) + router"
TEACHER, DISTILLED = "RIDE teacher (6 experts)", "RIDE (3 experts) + distillation"
BALPOE, SADE, SADE_TTA = "BalPoE (3 experts)", "SADE (3 experts)", "SADE (3 experts) + test-time aggregation"
LOGIT_ADJUSTED = "CE + post-hoc logit adjustment"
COLUMNS = ("overall", "many", "medium", "few")


@dataclass(frozen=True)
class Row:
    """One --methods key: the recipe suffix it trains and the table rows it produces (stage 1, then the recipe's
    stage 2 where it has one). `on_ce`: a stage 2 run on the seed's CE model. A variant names the plain row it is
    `compare_to`: another recipe (BalPoE with mixup) or the same recipe with extra `overrides` (RIDE in bf16)."""

    recipe: str
    labels: Tuple[str, ...]
    overrides: Tuple[str, ...] = ()
    compare_to: Optional[str] = None
    on_ce: bool = False


ROWS = {
    "ce": Row("ce", ("CE",)),
    "ldam_drw": Row("ldam_drw", ("LDAM-DRW",)),
    "balanced_softmax": Row("balanced_softmax", ("Balanced Softmax",)),
    "ride": Row("ride_router", (RIDE, ROUTED)),
    "ride_teacher": Row("ride_teacher", (TEACHER,)),
    "ride_distill": Row("ride_distill", (DISTILLED,)),
    "ride_bf16": Row("ride", ("RIDE (3 experts), bf16 autocast",), ("train.precision=bf16",), RIDE),
    "balpoe": Row("balpoe", (BALPOE,)),
    "balpoe_mixup": Row("balpoe_mixup", ("BalPoE (3 experts) + mixup",), compare_to=BALPOE),
    "sade": Row("sade", (SADE, SADE_TTA)),
    "reslt": Row("reslt", ("ResLT",)),
    "crt": Row("crt", ("cRT",), on_ce=True),
    "tau": Row("tau", ("tau-norm",), on_ce=True),
    "lws": Row("lws", ("LWS",), on_ce=True),
    "ncm": Row("ncm", ("NCM",), on_ce=True),
    "logit_adjust": Row("logit_adjust", (LOGIT_ADJUSTED,), on_ce=True),
}
KEYS = list(ROWS)
ORDER = [label for row in ROWS.values() for label in row.labels]


@dataclass(frozen=True)
class Benchmark:
    title: str  # the section heading: "# <title> results"
    test_set: str
    model: str  # the models, for the Setup paragraph
    augmentation: str


BENCHMARKS = {
    "mnist_lt": Benchmark(
        "MNIST-LT", "10k MNIST test set",
        "small CNN (3 conv blocks, 32/64/128 channels; RIDE, BalPoE, SADE: shared first block, 3 experts owning blocks "
        "2-3 at 3/4 width, cosine classifier x 30; ResLT: 3 BN branches, shared linear)",
        "pad-4 random crop without flip"),
    "fmnist_lt": Benchmark(
        "Fashion-MNIST-LT", "10k Fashion-MNIST test set",
        "ResNet-8 (one BasicBlock per stage, 16/32/64 channels, 1-channel stem; RIDE, BalPoE, SADE: shared stem + "
        "layer1, 3 experts owning layer2 / layer3 at 24 / 48 channels, cosine classifier x 30; ResLT: 3 BN branches, "
        "shared linear)",
        "pad-4 random crop and horizontal flip"),
}


def recipe_overrides(recipe: str, seed: int, epochs: int, out: str, extra=()) -> list:
    """The recipe's schedule (warmup 2, x0.1 at 80% and 90%) and, where it has one, its DRW start (80%) scaled to
    `epochs`, plus `extra`."""
    from fastlt.methods.config import read_recipe, resolve_path

    late = [max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))]
    overrides = [f"seed={seed}", f"out={out}", f"train.epochs={epochs}", f"train.schedule.milestones={late}",
                 f"train.schedule.warmup_epochs={min(2, epochs)}"]
    if "drw_epoch" in read_recipe(resolve_path(recipe)).get("method", {}):
        overrides.append(f"method.drw_epoch={late[0]}")
    return overrides + list(extra)


def scores(results: dict) -> dict:
    return {column: float(results[column]) for column in COLUMNS}


def trained(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "results.json"))


def run_key(prefix: str, key: str, seed: int, epochs: int, folder: str) -> tuple:
    """(rows, extras) of one --methods key for one seed; trains what it depends on when that is missing."""
    from fastlt.methods import load_config, load_stage1, run_stage2, train
    from fastlt.methods.builders import pick_device

    row = ROWS[key]
    recipe = f"{prefix}_{row.recipe}"
    rows, extras = {}, {}
    if row.on_ce:
        ce_recipe = f"{prefix}_ce"
        ce_folder = os.path.join(folder, ce_recipe)
        if not trained(ce_folder):  # a dependency only: its row stays the one the table already has
            config = load_config(ce_recipe, recipe_overrides(ce_recipe, seed, epochs, ce_folder))
            extras["ce_model"] = scores(train(config, progress_bar=False, verbose=False)["stage1"])
        config = load_config(recipe, recipe_overrides(recipe, seed, epochs, ce_folder, row.overrides))
        _, datasets, model = load_stage1(ce_folder)
        result = run_stage2(config, model, datasets, device=pick_device(), progress_bar=False, verbose=False)
        rows[row.labels[0]] = scores(result)
        if key in ("tau", "logit_adjust"):
            extras["tau" if key == "tau" else "logit_adjust_tau"] = result["chosen"]["tau"]
        return rows, extras
    extra = list(row.overrides)
    if key == "ride_distill":
        teacher_recipe = f"{prefix}_ride_teacher"
        teacher_folder = os.path.join(folder, teacher_recipe)
        if not trained(teacher_folder):
            train(load_config(teacher_recipe, recipe_overrides(teacher_recipe, seed, epochs, teacher_folder)),
                  progress_bar=False, verbose=False)
        extra.append(f"method.teacher={teacher_folder}")
    out = os.path.join(folder, key if row.overrides else recipe)
    result = train(load_config(recipe, recipe_overrides(recipe, seed, epochs, out, extra)), progress_bar=False,
                   verbose=False)
    rows[row.labels[0]] = scores(result["stage1"])
    if len(row.labels) > 1:  # the recipe's stage 2: RIDE's router, SADE's test-time aggregation
        rows[row.labels[1]] = scores(result["stage2"])
        chosen = result["stage2"]["chosen"]
        if key == "ride":
            extras["router"] = {name: chosen[name] for name in
                                ("share_per_num_experts", "mean_experts", "mflops_routed", "mflops_all_experts")}
        else:
            extras["sade_weights"] = chosen["weights"]
    return rows, extras


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_seed(seed: int, prefix: str, epochs: int, root: str, keys=tuple(KEYS)) -> dict:
    """Trains the `keys` rows for one seed (one intra-op thread: small models on a shared machine), reusing the
    rows the seed's summary.json already holds. Records each key's wall and CPU seconds."""
    import torch

    torch.set_num_threads(1)
    folder = os.path.join(root, f"seed{seed}")
    cached = os.path.join(folder, "summary.json")
    record = {"seed": seed, "epochs": epochs, "rows": {}, "extras": {}, "seconds": {}, "cpu_seconds": {}}
    if os.path.exists(cached):
        with open(cached) as handle:
            record = {**record, **json.load(handle)}
        if not isinstance(record["seconds"], dict):  # a summary written before per-row caching
            record["seconds"] = {"all": record["seconds"]}
    if record["epochs"] != epochs:
        raise SystemExit(f"{cached} holds {record['epochs']}-epoch rows: use --epochs {record['epochs']} or another "
                         f"--out")
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    for key in keys:
        if all(label in record["rows"] for label in ROWS[key].labels):
            continue
        key_started, key_cpu = time.time(), cpu_seconds()
        rows, extras = run_key(prefix, key, seed, epochs, folder)
        record["rows"].update(rows)
        record["extras"].update(extras)
        record["seconds"][key] = time.time() - key_started
        record["cpu_seconds"][key] = cpu_seconds() - key_cpu
        with open(cached, "w") as handle:
            json.dump(record, handle, indent=2)
        print(f"seed {seed}: {key} done ({time.time() - started:.0f} s)", flush=True)
    return record


def mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {spread:.1f}"


def read_section(path: str, title: str) -> tuple:
    """(all lines of the markdown file, [start, end) of the `# <title> results` section or None)."""
    if not os.path.exists(path):
        return [], None
    with open(path) as handle:
        lines = handle.read().splitlines()
    heading = f"# {title} results"
    if heading not in lines:
        return lines, None
    start = lines.index(heading)
    end = next((index for index in range(start + 1, len(lines)) if lines[index].startswith("# ")), len(lines))
    return lines, (start, end)


def previous_rows(section: list) -> dict:
    """{label: [cells]} of a section's table, to keep the rows a --methods run does not produce."""
    rows = {}
    for line in section:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 1 + len(COLUMNS) and cells[0] != "method":
            rows[cells[0]] = cells[1:]
    return rows


def cell_stats(cell: str) -> tuple:
    """(mean, std) of a "mean ± std" cell; NaN for a split without classes."""
    numbers = [float(number) for number in re.findall(r"-?[0-9]+(?:\.[0-9]+)?", cell)]
    return tuple(numbers[:2]) if len(numbers) >= 2 else (float("nan"), float("nan"))


def table_rows(records, kept: dict) -> dict:
    """label -> (cells, {column: (mean, std)}): the records' rows where every seed has them, else the kept row."""
    table = {}
    for label in ORDER:
        if records and all(label in record["rows"] for record in records):
            values = {column: [record["rows"][label][column] for record in records] for column in COLUMNS}
            table[label] = [mean_std(values[column]) for column in COLUMNS]
        elif label in kept:
            table[label] = kept[label]
    return {label: (cells, {column: cell_stats(cell) for column, cell in zip(COLUMNS, cells)})
            for label, cells in table.items()}


def orderings(stats: dict) -> list:
    """The papers' claims, checked on the seed means: few-shot accuracy above CE; RIDE above LDAM-DRW; distillation
    and the decoupled classifiers at least their baselines; BalPoE and SADE at least RIDE; SADE's test-time
    aggregation at least plain SADE. A variant row is checked against its plain row: within seed noise when the
    means differ by at most the two rows' seed stds added."""
    lines = []

    def check(label, reference, column, strict):
        if label not in stats or reference not in stats:
            return
        value, other = stats[label][column][0], stats[reference][column][0]
        holds = value > other if strict else value >= other
        relation = "above" if strict else "at least"
        lines.append(f"- {label} {relation} {reference} on {column}: {'holds' if holds else 'does NOT hold'} "
                     f"({value:.1f} vs {other:.1f}).")

    for label in (RIDE, ROUTED, DISTILLED, "cRT", "tau-norm", "LWS", "NCM", LOGIT_ADJUSTED):
        check(label, "CE", "few", strict=True)
    check(RIDE, "LDAM-DRW", "overall", strict=True)
    check(DISTILLED, RIDE, "overall", strict=False)
    for label in ("cRT", "tau-norm"):
        check(label, "LDAM-DRW", "overall", strict=False)
    for label in (BALPOE, SADE, SADE_TTA):
        for column in ("few", "overall"):
            check(label, RIDE, column, strict=False)
    for column in ("few", "overall"):
        check(SADE_TTA, SADE, column, strict=False)
    for row in ROWS.values():
        label, plain = row.labels[0], row.compare_to
        if plain is None or label not in stats or plain not in stats:
            continue
        (value, spread), (other, other_spread) = stats[label]["overall"], stats[plain]["overall"]
        if spread + other_spread == 0:  # one seed: no spread to judge the difference by
            verdict = "no seed spread to judge it by"
        else:
            within = abs(value - other) <= spread + other_spread
            verdict = f"{'within' if within else 'NOT within'} seed noise (stds {spread:.1f} + {other_spread:.1f})"
        lines.append(f"- {label} vs {plain} on overall: {value - other:+.1f} ({value:.1f} vs {other:.1f}), {verdict}.")
    return lines


def _router_line(routers) -> str:
    shares = {k: np.mean([r["share_per_num_experts"][k] for r in routers]) for k in routers[0]["share_per_num_experts"]}
    return ("RIDE router on test (mean over seeds): samples stopping after 1 / 2 / 3 experts: " +
            " / ".join(f"{100 * share:.1f}%" for share in shares.values()) +
            f"; {np.mean([r['mflops_routed'] for r in routers]):.2f} MFLOPs (MACs) per image routed vs "
            f"{routers[0]['mflops_all_experts']:.2f} with all experts.")


# extras key -> (the paragraph's first words, the paragraph from the per-seed values)
EXTRAS = {
    "tau": ("tau picked on val per seed", lambda taus: f"tau picked on val per seed: {[round(t, 2) for t in taus]}."),
    "router": ("RIDE router on test", _router_line),
    "logit_adjust_tau": ("Post-hoc logit adjustment: tau picked",
                         lambda taus: f"Post-hoc logit adjustment: tau picked on val per seed: "
                                      f"{[round(t, 2) for t in taus]}."),
    "sade_weights": ("SADE test-time expert weights",
                     lambda seeds: "SADE test-time expert weights (forward / uniform / backward) per seed: " +
                                   ", ".join("/".join(f"{w:.2f}" for w in weights) for weights in seeds) + "."),
    "ce_model": ("The CE models ",
                 lambda models: f"The CE models this command's stage-2 rows start from were trained by it (the CE row "
                                f"above is the previous table's): test overall "
                                f"{mean_std([model['overall'] for model in models])}."),
}


def extras_lines(records, previous: list) -> list:
    """What the stage 2s chose per seed (tau, router shares, SADE's weights, ...), else the previous section's
    paragraph; each paragraph preceded by a blank line."""
    lines = []
    for key, (start, paragraph) in EXTRAS.items():
        if all(key in record["extras"] for record in records):
            lines += ["", paragraph([record["extras"][key] for record in records])]
        else:
            lines += [line for kept in previous if kept.startswith(start) for line in ("", kept)][:2]
    return lines


METHODS_SETUP = (
    "warmup 2 then x0.1 at 80% and 90% of training, DRW (LDAM-DRW, RIDE) from 80%, {augmentation}; decoupled "
    "classifiers on each seed's CE model: cRT / LWS 10 epochs, class-aware sampler 4 per class, lr 0.2, "
    "start-of-epoch cosine, BN statistics updating; RIDE router 5 epochs, pos_weight 100, threshold 0.5; RIDE "
    "distillation from the same seed's 6-expert RIDE teacher, T_d 1.5, both terms x E as in the official code, "
    "teacher in train mode. BalPoE: taus 0 / 1 / 2, expert losses averaged, {balpoe_mixup}. SADE: forward / uniform "
    "/ backward experts (backward tau 2), losses summed; its test-time aggregation learns the 3 expert weights on two "
    "augmented views of the UNLABELED test images (5 epochs, batch 128, lr 0.1), as the official code. Post-hoc "
    "logit adjustment: each seed's CE model, argmax z - tau log pi, tau on val.")


def protocol(prefix: str, benchmark: Benchmark, seeds, epochs: int) -> tuple:
    """(data paragraph, start of the setup paragraph, BalPoE's mixup), read from the benchmark's recipes."""
    from fastlt.data import FashionMNISTLT, MNISTLT, exponential_counts, shot_split
    from fastlt.methods import load_config

    config = load_config(f"{prefix}_ce")
    data, train = config["data"], config["train"]
    dataset = {"mnist_lt": MNISTLT, "fashion_mnist_lt": FashionMNISTLT}[data["name"]]
    val_per_class = data.get("val_per_class", inspect.signature(dataset).parameters["val_per_class"].default)
    counts = exponential_counts(data["n_max"], data["ratio"], 10)
    groups = [f"{name} = classes {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"{name} = class {ids[0]}"
              for name, ids in zip(("many", "medium", "few"), (ids.tolist() for ids in shot_split(counts))) if ids]
    data_text = (
        f"{benchmark.title} (n_max {data['n_max']}, ratio {data['ratio']}: {', '.join(map(str, counts))} training "
        f"images per class, {sum(counts):,} in all; {', '.join(groups)}), one fixed LT subset; evaluated on the "
        f"{benchmark.test_set}. Model selection (best epoch) and tau on the balanced val split "
        f"({val_per_class} images per class drawn from training images outside the LT subset); never on "
        f"test. Seeds {list(seeds)} (initialisation and sampling order); mean ± sample std over seeds, accuracies "
        f"in %. Split accuracies are means of per-class accuracies.")
    mixup = load_config(f"{prefix}_balpoe")["train"].get("mixup")
    setup = (f"Setup: {benchmark.model}, {epochs} epochs, batch {train['batch_size']}, SGD lr {train['lr']}"
             f"{' Nesterov' if train.get('nesterov') else ''}, wd {train['weight_decay']:g}")
    return data_text, setup, f"mixup {mixup}" if mixup else "no mixup"


def variant_recipe(prefix: str, row: Row) -> str:
    """What a variant row trains: its recipe, its extra overrides, and the recipe's mixup when it has one."""
    from fastlt.methods import load_config

    mixup = load_config(f"{prefix}_{row.recipe}")["train"].get("mixup")
    return (f"{prefix}_{row.recipe}" + (f" with `{' '.join(row.overrides)}`" if row.overrides else "") +
            (f" (train.mixup {mixup})" if mixup else ""))


def write_markdown(prefix: str, records, path: str, command: str, keys, load: tuple) -> None:
    benchmark = BENCHMARKS[prefix]
    lines, span = read_section(path, benchmark.title)
    previous = lines[span[0]:span[1]] if span else []
    table = table_rows(records, previous_rows(previous))
    epochs = records[0]["epochs"]
    wall = ", ".join(f"{sum(record['seconds'].get(key, 0.0) for key in keys) / 60:.1f}" for record in records)
    cpu = ", ".join(f"{sum(record['cpu_seconds'].get(key, 0.0) for key in keys) / 60:.1f}" for record in records)
    produced = [label for label in ORDER if all(label in record["rows"] for record in records)]
    data_text, setup, balpoe_mixup = protocol(prefix, benchmark, [record["seed"] for record in records], epochs)
    methods_setup = METHODS_SETUP.format(augmentation=benchmark.augmentation, balpoe_mixup=balpoe_mixup)
    variants = " ".join(f"{row.labels[0]}: {variant_recipe(prefix, row)}." for row in ROWS.values() if row.compare_to)
    section = [
        f"# {benchmark.title} results", "",
        f"Regenerate with: `{command}`", "",
        data_text, "",
        f"{setup}, {methods_setup} {variants} One intra-op thread per "
        f"seed; the rows this command trained ({', '.join(keys)}) took {wall} min per seed (wall clock, seeds side "
        f"by side, --jobs) and {cpu} CPU min per seed, on {platform.machine()} ({os.cpu_count()} cores; 1-minute "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end).", "",
        "| method | overall | many | medium | few |", "|---|---:|---:|---:|---:|"]
    section += [f"| {label} | " + " | ".join(table[label][0]) + " |" for label in ORDER if label in table]
    not_rerun = [label for label in table if label not in produced]
    if not_rerun:
        section += ["", f"Rows kept from the previous table (not re-run by this command): {', '.join(not_rerun)}. "
                        f"`python tools/lt_results.py {prefix} --jobs 3` (no --methods) re-trains every row."]
    section += extras_lines(records, previous)
    section += ["", "## Do the papers' orderings hold?", ""] + orderings({k: v[1] for k, v in table.items()})
    reading = next((index for index, line in enumerate(previous) if line.startswith("Reading")), None)
    section += [""] + (previous[reading:] if reading is not None else [])
    while section[-1] == "":
        section.pop()
    if span is None:
        while lines and lines[-1] == "":
            lines.pop()
        lines = lines + ([""] if lines else []) + section
    else:
        lines = lines[:span[0]] + section + ([""] if span[1] < len(lines) else []) + lines[span[1]:]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", choices=sorted(BENCHMARKS), help="the benchmark: its recipes' name prefix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2, help="seeds trained at the same time (one thread each)")
    parser.add_argument("--methods", nargs="+", choices=KEYS, default=KEYS,
                        help="train only these rows (default: all); the markdown keeps the others' previous numbers")
    parser.add_argument("--out", help="run folders and per-seed caches (default runs/<prefix>_results)")
    parser.add_argument("--markdown", default="RESULTS.md")
    args = parser.parse_args(argv)
    keys = [key for key in KEYS if key in args.methods]
    out = args.out or f"runs/{args.prefix}_results"
    load_at_start = os.getloadavg()[0]
    work = functools.partial(run_seed, prefix=args.prefix, epochs=args.epochs, root=out, keys=keys)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        records = list(pool.map(work, args.seeds))
    command = "python " + " ".join(["tools/lt_results.py"] + (argv if argv is not None else sys.argv[1:]))
    write_markdown(args.prefix, records, args.markdown, command, keys, (load_at_start, os.getloadavg()[0]))
    lines, (start, end) = read_section(args.markdown, BENCHMARKS[args.prefix].title)
    print("\n".join(lines[start:end]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
