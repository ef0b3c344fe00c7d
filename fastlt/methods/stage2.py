"""`fastlt stage2 {crt,lws,tau,ncm,router,logit_adjust,sade}` on a trained stage-1 model: the `stage2:` section of a
recipe.

Each writes `<out>/stage2_<name>/`: stage2.json (what was chosen: tau, router shares, SADE's expert weights, ...),
model.pt (the model with its new head; the router's weights for router; nothing for logit_adjust and sade, which
keep the stage-1 model and store their few numbers in stage2.json), results.json and per_class_accuracy.png on the
test split.
"""

import json
import os

import torch

from fastlt.data.transforms import SADE_VIEWS
from fastlt.engine import RunFolder, evaluate_logits, format_results, predict, write_json
from fastlt.methods import decoupling, logit_adjust, router as routing, sade
from fastlt.methods.builders import build_loader, build_sampler, evaluate
from fastlt.methods.config import ConfigError
from fastlt.models import RIDE, FeatureClassifier, LearnableWeightScaling, NearestClassMean, TauNormLinear

STAGE2_METHODS = ("crt", "lws", "tau", "ncm", "router", "logit_adjust", "sade")
NEEDS_MODEL = {"router": RIDE, "sade": RIDE, "logit_adjust": torch.nn.Module}  # else FeatureClassifier


def stage2_folder(config: dict, name: str) -> str:
    return os.path.join(config["out"], f"stage2_{name}")


def run_stage2(config: dict, model, datasets: dict, *, device, progress_bar: bool = True, verbose: bool = True) -> dict:
    """Runs config["stage2"] on `model` (stage-1 weights, modified in place) and returns its test results."""
    options = config["stage2"]
    name = options["name"]
    if name not in STAGE2_METHODS:
        raise ConfigError(f"stage2.name: unknown method {name!r}; expected one of {STAGE2_METHODS}")
    needs = NEEDS_MODEL.get(name, FeatureClassifier)
    if not isinstance(model, needs):
        raise ConfigError(f"stage2 {name}: needs a {needs.__name__} stage-1 model, got {type(model).__name__} "
                          f"({config['model']['name']})")
    folder = stage2_folder(config, name)
    run = RunFolder(folder, config=config, progress_bar=progress_bar)
    data, seed = config["data"], config.get("seed", 0)
    train_set, counts = datasets["train"], datasets["train"].train_class_counts
    eval_batch = config["train"].get("eval_batch_size", 256)
    plain_loader = {split: None if datasets[split] is None else build_loader(datasets[split], data, eval_batch,
                                                                              train=False)
                    for split in ("train", "val", "test")}
    chosen = {"name": name}
    logits = targets = None
    if name in ("crt", "lws"):
        head = decoupling.crt_head(model) if name == "crt" else decoupling.lws_head(model)
        batch_size, epochs = options.get("batch_size", 128), options.get("epochs", 10)
        sampler = build_sampler(train_set, options.get("sampler", "class_aware"), seed, epochs,
                                options.get("samples_per_class", 4), key="stage2.sampler")
        loader = build_loader(train_set, data, batch_size, train=True, sampler=sampler, seed=seed)
        fitted = decoupling.retrain_classifier(
            model, head.to(device), loader, epochs=epochs, lr=options.get("lr", 0.2),
            weight_decay=options.get("weight_decay", 5e-4), run=run, sampler=sampler, val_loader=plain_loader["val"],
            class_counts=counts, freeze_bn=options.get("freeze_bn", False), device=device,
            steps_per_epoch=decoupling.class_aware_steps(len(train_set), batch_size))
        chosen["best_epoch"] = fitted["best_epoch"]
    elif name == "tau":
        tau = options.get("tau")
        if tau is None:
            split = options.get("select_on", "val")
            if plain_loader[split] is None:
                raise ConfigError(f"stage2 tau: no {split} split to pick tau on; set stage2.tau or stage2.select_on")
            if split == "test":
                print("stage2 tau: picking tau on the TEST split, as requested by stage2.select_on", flush=True)
            features, labels = decoupling.extract_features(model, plain_loader[split], device)
            tau, rows = decoupling.select_tau(features, labels, model.classifier.weight.detach().cpu(), counts,
                                              options.get("taus", decoupling.DEFAULT_TAUS))
            chosen.update(selected_on=split, sweep=rows)
        chosen["tau"] = tau
        model.classifier = decoupling.tau_norm_head(model, tau)
    elif name == "ncm":
        features, labels = decoupling.extract_features(model, plain_loader["train"], device)
        model.classifier = decoupling.ncm_head(features, labels, train_set.num_classes,
                                               options.get("feature_transform", "cl2n"), options.get("distance", "l2"))
        model.to(device)
    elif name == "logit_adjust":
        tau = options.get("tau")
        if tau is None:
            split = options.get("select_on", "val")
            if plain_loader[split] is None:
                raise ConfigError(f"stage2 logit_adjust: no {split} split to pick tau on; set stage2.tau or "
                                  f"stage2.select_on")
            if split == "test":
                print("stage2 logit_adjust: picking tau on the TEST split, as requested by stage2.select_on",
                      flush=True)
            val_logits, val_targets = predict(model, plain_loader[split], device=device)
            tau, rows = logit_adjust.select_tau(val_logits, val_targets, counts,
                                                options.get("taus", logit_adjust.DEFAULT_TAUS))
            chosen.update(selected_on=split, sweep=rows)
        chosen["tau"] = tau
        test_logits, targets = predict(model, plain_loader["test"], device=device)
        logits = logit_adjust.adjust(test_logits, counts, tau)
    elif name == "sade":
        weights, history = adapt_sade_weights(model, datasets, data, options, seed, device, run)
        chosen.update(adapted_on=options.get("adapt_on", "test"), weights=weights.tolist(), history=history)
        expert_logits, targets = sade.predict_experts(model, plain_loader["test"], device)
        logits = sade.aggregate(expert_logits, weights.cpu().log())
    else:
        router = routing.ExpertRouter(model.num_experts, model.classifiers[0].weight.shape[0], train_set.num_classes,
                                      top_k=options.get("top_k", 30), init=options.get("init", "default")).to(device)
        epochs = options.get("epochs", 5)
        sampler = build_sampler(train_set, options.get("sampler", "ride_balanced"), seed, epochs, key="stage2.sampler")
        loader = build_loader(train_set, data, options.get("batch_size", 128), train=True, sampler=sampler, seed=seed)
        history = routing.train_router(
            model, router, loader, epochs=epochs, lr=options.get("lr", 0.01),
            weight_decay=options.get("weight_decay", 5e-4), pos_weight=options.get("pos_weight", routing.POS_WEIGHT),
            device=device, sampler=sampler, progress=lambda batches, desc: run.progress(batches, desc=desc))
        for record in history:
            run.log(record)
        logits, targets, used = routing.routed_predict(model, router, plain_loader["test"],
                                                       options.get("threshold", 0.5), device)
        chosen.update(top_k=router.top_k, **routing.routed_macs(model, tuple(train_set[0][0].shape), used))
        torch.save(router.state_dict(), os.path.join(folder, "router.pt"))
    if name not in ("router", "logit_adjust", "sade"):
        torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
    write_json(os.path.join(folder, "stage2.json"), chosen)
    title = f"{config.get('name', name)} (stage 2: {name})"
    results = evaluate(model, plain_loader["test"], counts, folder, title, device, logits, targets)
    if verbose:
        extra = (f" (tau {chosen['tau']:.1f}, picked on {chosen.get('selected_on', 'config')})"
                 if name in ("tau", "logit_adjust") else "")
        if name == "sade":
            extra = " (expert weights " + ", ".join(f"{w:.2f}" for w in chosen["weights"]) + \
                    f" learned on unlabeled {chosen['adapted_on']} images)"
        print(f"\n{title}{extra} on test:\n{format_results(results)}", flush=True)
        if name == "router":
            shares = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in chosen["share_per_num_experts"].items())
            print(f"samples per number of experts: {shares}; {chosen['mflops_routed']:.2f} MFLOPs (MACs) routed vs "
                  f"{chosen['mflops_all_experts']:.2f} with all experts", flush=True)
    run.close()
    return {**results, "chosen": chosen}


def adapt_sade_weights(model, datasets, data: dict, options: dict, seed: int, device, run):
    """SADE's test-time aggregation weights, learned on two strongly augmented views of the unlabeled `adapt_on`
    split (default test, as the official code; labels are never read). `views` names the official augmentation
    (fastlt.data.transforms.SADE_VIEWS: cifar, imagenet, inaturalist); default cifar for array datasets (on grey
    images its grey analogue), imagenet for image files."""
    split = options.get("adapt_on", "test")
    if datasets.get(split) is None:
        raise ConfigError(f"stage2 sade: no {split} split to adapt the expert weights on; set stage2.adapt_on")
    if model.num_experts != 3:
        raise ConfigError(f"stage2 sade: needs the 3-expert SADE model, got {model.num_experts} experts")
    views = options.get("views", "cifar" if hasattr(datasets[split], "images") else "imagenet")
    if views not in SADE_VIEWS:
        raise ConfigError(f"stage2 sade: views must be one of {sorted(SADE_VIEWS)}, got {views!r}")
    batch_size, epochs = options.get("batch_size", 128), options.get("epochs", 5)
    # the view replaces the training augmentation (its crop and flip settings kept): torch loader, always augmented
    view_data = {**data, "loader": "torch", "augment": True,
                 "augment_options": {**data.get("augment_options", {}), "strong": SADE_VIEWS[views]}}
    # the same shuffled order in both loaders, each drawing its own augmentation (the official TwoCropsTransform)
    view_loaders = [build_loader(datasets[split], view_data, batch_size, train=True, seed=seed + view,
                                 sampler=build_sampler(datasets[split], "instance_balanced", seed, epochs))
                    for view in range(2)]
    return sade.adapt_expert_weights(
        sade.frozen_expert_logits(model, device), view_loaders, epochs=epochs, lr=options.get("lr", 0.1),
        weight_decay=options.get("weight_decay", 5e-4), num_experts=model.num_experts, on_epoch_end=run.log,
        device=device)


def attach_head(model, chosen: dict, num_classes: int):
    """Puts the head skeleton of a saved stage-2 model on `model` so model.pt loads into it."""
    name, linear = chosen["name"], model.classifier
    if name == "crt":
        model.classifier = decoupling.crt_head(model)
    elif name == "lws":
        model.classifier = LearnableWeightScaling.from_linear(linear)
    elif name == "tau":
        model.classifier = TauNormLinear.from_linear(linear, chosen["tau"])
    elif name == "ncm":
        model.classifier = NearestClassMean(linear.in_features, num_classes)
    return model


def evaluate_stage2(folder: str, model, datasets, data: dict, device, split: str = "test") -> dict:
    """Re-evaluates a saved stage-2 result (`fastlt eval --run <out>/stage2_<name>`)."""
    with open(os.path.join(folder, "stage2.json")) as handle:
        chosen = json.load(handle)
    loader = build_loader(datasets[split], data, 256, train=False)
    if chosen["name"] == "router":
        router = routing.ExpertRouter(model.num_experts, model.classifiers[0].weight.shape[0],
                                      datasets["train"].num_classes, top_k=chosen["top_k"])
        router.load_state_dict(torch.load(os.path.join(folder, "router.pt"), map_location=device))
        logits, targets, _ = routing.routed_predict(model, router.to(device), loader, device=device)
        return evaluate_logits(logits, targets, datasets["train"].train_class_counts)
    if chosen["name"] == "logit_adjust":
        logits, targets = predict(model.to(device), loader, device=device)
        logits = logit_adjust.adjust(logits, datasets["train"].train_class_counts, chosen["tau"])
        return evaluate_logits(logits, targets, datasets["train"].train_class_counts)
    if chosen["name"] == "sade":
        expert_logits, targets = sade.predict_experts(model.to(device), loader, device)
        logits = sade.aggregate(expert_logits, torch.tensor(chosen["weights"]).log())
        return evaluate_logits(logits, targets, datasets["train"].train_class_counts)
    attach_head(model, chosen, datasets["train"].num_classes)
    model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), map_location=device))
    logits, targets = predict(model.to(device), loader, device=device)
    return evaluate_logits(logits, targets, datasets["train"].train_class_counts)
