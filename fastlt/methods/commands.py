"""The `fastlt train`, `fastlt eval`, `fastlt stage2` and `fastlt methods` subcommands (argparse lives in
fastlt/cli.py)."""

import os

from fastlt.engine import format_results, plot_per_class_accuracy
from fastlt.errors import ConfigError, UserError
from fastlt.methods import registry
from fastlt.methods.builders import build_loader, pick_device
from fastlt.methods.config import apply_overrides, check_config, load_config, resolve_path
from fastlt.methods.options import closest, table
from fastlt.methods.pipeline import load_stage1, seed_everything, stage1_recipe, train
from fastlt.methods.recipe import RecipeOptions, parse_recipe
from fastlt.methods.stage2 import evaluate_stage2, run_stage2


def train_command(args) -> dict:
    """fastlt train --config <recipe or yaml> [key=value ...]"""
    return train(load_config(args.config, args.overrides), progress_bar=not args.no_progress)


def recipe_help(name_or_path: str, overrides=()) -> str:
    """Every key of a recipe (its method's, its model's, its data set's, its schedule's) with its value there, its
    default and its meaning, generated from the declarations."""
    recipe = parse_recipe(load_config(name_or_path, overrides))
    return (f"{resolve_path(name_or_path)}: every key of this recipe, its value, its default and its meaning. Override "
            f"any with key=value (e.g. train.epochs=5); `fastlt methods` lists the other methods.\n\n"
            + table(RecipeOptions, recipe))


def methods_command(args) -> None:
    """fastlt methods [NAME]: the registered methods, or a method's options (defaults and meaning)."""
    if args.name is None:
        for stage, title in ((1, "stage-1 methods (a recipe's method: section)"),
                             (2, "stage-2 methods (a recipe's stage2: section, or fastlt stage2 NAME <run>)")):
            names = registry.method_names(stage)
            width = max(len(name) for name in names)
            print(f"{title}:")
            for name in names:
                print(f"  {name:<{width}}  {registry.get_method(name, stage).summary}")
        print("\n`fastlt methods NAME`: a method's options; `fastlt train --config RECIPE --help`: a recipe's keys.")
        return
    found = [stage for stage in (1, 2) if args.name in registry.method_names(stage)]
    if not found:
        close = closest(args.name, registry.method_names(1) + registry.method_names(2))
        raise ConfigError(f"unknown method {args.name!r}; " + (f"did you mean {close}?" if close else
                                                                "`fastlt methods` lists them"))
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(registry.__file__)))
    for stage in found:
        method = registry.get_method(args.name, stage)
        section = "method" if stage == 1 else "stage2"
        print(f"{args.name}: stage-{stage} method ({section}: {{name: {args.name}, ...}}), "
              f"{os.path.relpath(method.source, package_root)}\n"
              f"  {method.summary}\n{table(method.options, path=section, skip=('name',))}\n")


def stage2_command(args) -> dict:
    """fastlt stage2 {crt,lws,tau,ncm,router,logit_adjust,sade} <stage-1 run folder> [stage2.key=value ...]
    (or --run <folder>): the recipe's own stage2 section when it names this method, else the method's defaults,
    then the overrides."""
    args.run = args.run or args.run_option
    if not args.run:
        raise UserError("give the stage-1 run folder (fastlt stage2 tau runs/<run> [key=value ...])")
    config, datasets, model = load_stage1(args.run, device=pick_device())
    config = check_config(apply_overrides(config, [f"stage2.name={args.method}", *args.overrides]))
    config["out"] = args.run
    recipe = parse_recipe(config)
    seed_everything(recipe.seed)  # a new head's init and the augmentation: the same on every run
    return run_stage2(config, model, datasets, device=pick_device(recipe.device), progress_bar=not args.no_progress)


def eval_command(args) -> dict:
    """fastlt eval --run <run folder or its stage2_<name> folder> [--checkpoint path] [--split test|val]"""
    device = pick_device()
    is_stage2 = os.path.exists(os.path.join(args.run, "stage2.json"))
    stage1_dir = os.path.dirname(os.path.normpath(args.run)) if is_stage2 else args.run
    config, datasets, model = load_stage1(stage1_dir, None if is_stage2 else args.checkpoint, device=device)
    recipe = stage1_recipe(config)
    if datasets[args.split] is None:
        raise UserError(f"this dataset has no {args.split} split: evaluate with --split test")
    counts = datasets["train"].train_class_counts
    if is_stage2:
        results = evaluate_stage2(args.run, model, datasets, recipe, device, args.split)
    else:
        from fastlt.engine import evaluate_logits, predict

        loader = build_loader(datasets[args.split], recipe.data, recipe.train.eval_batch_size, train=False)
        results = evaluate_logits(*predict(model, loader, device=device), counts)
    plot = os.path.join(args.run, f"eval_{args.split}_per_class_accuracy.png")
    plot_per_class_accuracy(results["per_class"], counts, plot, title=f"{recipe.name or ''} ({args.split})")
    print(f"{args.run} on {args.split}:\n{format_results(results)}\nper-class plot: {plot}")
    return results
