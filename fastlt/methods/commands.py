"""The `fastlt train`, `fastlt eval` and `fastlt stage2` subcommands (argparse lives in fastlt/cli.py)."""

import os

from fastlt.engine import format_results, plot_per_class_accuracy
from fastlt.methods.builders import build_loader, pick_device
from fastlt.methods.config import apply_overrides, check_config, load_config
from fastlt.methods.pipeline import load_stage1, train
from fastlt.methods.stage2 import STAGE2_METHODS, evaluate_stage2, run_stage2


def train_command(args) -> dict:
    """fastlt train --config <recipe or yaml> [key=value ...]"""
    return train(load_config(args.config, args.overrides), progress_bar=not args.no_progress)


def stage2_command(args) -> dict:
    """fastlt stage2 {crt,lws,tau,ncm,router,logit_adjust,sade} <stage-1 run folder> [stage2.key=value ...]
    (or --run <folder>): the recipe's own stage2 section when it names this method, else the method's defaults,
    then the overrides."""
    args.run = args.run or args.run_option
    if not args.run:
        raise SystemExit("fastlt stage2: give the stage-1 run folder (fastlt stage2 tau runs/<run> [key=value ...])")
    config, datasets, model = load_stage1(args.run, device=pick_device())
    if (config.get("stage2") or {}).get("name") != args.method:
        config["stage2"] = {"name": args.method}
    config = check_config(apply_overrides(config, args.overrides))
    config["out"] = args.run
    return run_stage2(config, model, datasets, device=pick_device(config.get("device", "auto")),
                      progress_bar=not args.no_progress)


def eval_command(args) -> dict:
    """fastlt eval --run <run folder or its stage2_<name> folder> [--checkpoint path] [--split test|val]"""
    device = pick_device()
    is_stage2 = os.path.exists(os.path.join(args.run, "stage2.json"))
    stage1_dir = os.path.dirname(os.path.normpath(args.run)) if is_stage2 else args.run
    config, datasets, model = load_stage1(stage1_dir, None if is_stage2 else args.checkpoint, device=device)
    if datasets[args.split] is None:
        raise SystemExit(f"fastlt eval: this dataset has no {args.split} split")
    counts = datasets["train"].train_class_counts
    if is_stage2:
        results = evaluate_stage2(args.run, model, datasets, config["data"], device, args.split)
    else:
        from fastlt.engine import evaluate_logits, predict

        loader = build_loader(datasets[args.split], config["data"], 256, train=False)
        results = evaluate_logits(*predict(model, loader, device=device), counts)
    plot = os.path.join(args.run, f"eval_{args.split}_per_class_accuracy.png")
    plot_per_class_accuracy(results["per_class"], counts, plot, title=f"{config.get('name', '')} ({args.split})")
    print(f"{args.run} on {args.split}:\n{format_results(results)}\nper-class plot: {plot}")
    return results


def add_subcommands(commands) -> None:
    """Registers train / eval / stage2 on the `fastlt` argparse subparsers."""
    p_train = commands.add_parser("train", help="train a recipe (and its stage 2), report many/medium/few on test")
    p_train.add_argument("--config", required=True, help="a YAML file or a packaged recipe name, e.g. mnist_lt_ride")
    p_train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    p_train.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p_train.set_defaults(handler=train_command)
    p_eval = commands.add_parser("eval", help="evaluate a run folder (stage 1 or stage2_<name>)")
    p_eval.add_argument("--run", required=True)
    p_eval.add_argument("--checkpoint", help="a stage-1 checkpoint (default: best.pt with val, else last.pt)")
    p_eval.add_argument("--split", default="test", choices=("test", "val"))
    p_eval.set_defaults(handler=eval_command)
    p_stage2 = commands.add_parser("stage2", help="Decoupling classifiers, RIDE's router, post-hoc logit adjustment "
                                                  "or SADE's test-time expert aggregation on a stage-1 run")
    p_stage2.add_argument("method", choices=STAGE2_METHODS)
    # the run folder as a positional (before any overrides) or as --run (argparse cannot put overrides after it)
    p_stage2.add_argument("run", nargs="?", help="the stage-1 run folder")
    p_stage2.add_argument("--run", dest="run_option", help="the stage-1 run folder (when no overrides follow)")
    p_stage2.add_argument("overrides", nargs="*", help="e.g. stage2.epochs=5 stage2.freeze_bn=true")
    p_stage2.add_argument("--no-progress", action="store_true")
    p_stage2.set_defaults(handler=stage2_command)
