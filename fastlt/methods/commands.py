"""The `fastlt train`, `fastlt eval` and `fastlt stage2` subcommands (argparse lives in fastlt/cli.py)."""

import os

from fastlt.engine import format_results, plot_per_class_accuracy
from fastlt.errors import UserError
from fastlt.methods.builders import build_loader, pick_device
from fastlt.methods.config import apply_overrides, check_config, load_config
from fastlt.methods.pipeline import load_stage1, train
from fastlt.methods.stage2 import evaluate_stage2, run_stage2


def train_command(args) -> dict:
    """fastlt train --config <recipe or yaml> [key=value ...]"""
    return train(load_config(args.config, args.overrides), progress_bar=not args.no_progress)


def stage2_command(args) -> dict:
    """fastlt stage2 {crt,lws,tau,ncm,router,logit_adjust,sade} <stage-1 run folder> [stage2.key=value ...]
    (or --run <folder>): the recipe's own stage2 section when it names this method, else the method's defaults,
    then the overrides."""
    args.run = args.run or args.run_option
    if not args.run:
        raise UserError("give the stage-1 run folder (fastlt stage2 tau runs/<run> [key=value ...])")
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
        raise UserError(f"this dataset has no {args.split} split: evaluate with --split test")
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
