"""RIDE stage 2: the expert-assignment router (docs/methods.md §3.4), trained on a frozen RIDE model.

Router i (i = 0..E-2) decides from expert i's normalised pooled feature (through a 16-d hidden layer of its own)
and the top-k values of the running mean logits of experts 0..i (through one shared output layer) whether to
evaluate expert i + 1. Target: "the ensemble so far is wrong and a larger one is right"; BCE with pos_weight 100.
At test time each sample stops at the first router saying no (sigmoid <= threshold), and the prediction is the
mean of the experts it went through (`fastlt.ops.expert_aggregate(active=)`).

>>> from fastlt.models import create_model
>>> model = create_model("ride_small_cnn", num_classes=10, num_experts=3).eval()
>>> router = ExpertRouter(num_experts=3, feature_dim=96, num_classes=10, top_k=30)
>>> logits, experts_used = routed_forward(model, router, torch.zeros(4, 1, 28, 28))
>>> logits.shape, experts_used.tolist() in ([1] * 4, [2] * 4, [3] * 4)
(torch.Size([4, 10]), True)
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from fastlt import ops
from fastlt.engine import build_schedule, build_sgd
from fastlt.engine.loop import move_batch
from fastlt.methods.builders import SamplerOptions
from fastlt.methods.options import Named, declared, default_of, option
from fastlt.methods.registry import register_method
from fastlt.methods.stage2 import Stage2Context, Stage2Result
from fastlt.models import RIDE, NormedLinear

POS_WEIGHT = 100.0


class ExpertRouter(nn.Module):
    """E - 1 binary routers: r_i = shared_fc([top-k(running mean logits_i) | ReLU(fc_i(normalise(feat_i)))]).

    top_k: 30 on CIFAR-100-LT and ImageNet-LT ResNet-10, 50 for ResNet-50 / ResNeXt-50 / iNat (capped at C).
    init: "kaiming" draws every Linear weight with kaiming_normal_ (biases keep PyTorch's default), as the official
    CIFAR EA ResNet-32 (its `_weights_init` runs over the router too); "default" keeps PyTorch's init, as the
    official ImageNet-LT / iNat EA ResNets.
    """

    INITS = ("default", "kaiming")

    def __init__(self, num_experts: int, feature_dim: int, num_classes: int, top_k: int = 30, hidden: int = 16,
                 init: str = "default"):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"ExpertRouter: routing needs at least 2 experts, got {num_experts}")
        if init not in self.INITS:
            raise ValueError(f"ExpertRouter: init must be one of {self.INITS}, got {init!r}")
        self.top_k = min(top_k, num_classes)
        self.init = init
        self.hidden = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(num_experts - 1))
        self.predict = nn.Linear(self.top_k + hidden, 1)
        if init == "kaiming":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight)

    def extra_repr(self) -> str:
        return f"num_routers={len(self.hidden)}, top_k={self.top_k}, init={self.init!r}"

    def step(self, index: int, features: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        """Router `index`'s logit [B] from expert `index`'s features [B, D] and the running mean logits [B, C]."""
        top = mean_logits.topk(self.top_k, dim=1).values
        hidden = F.relu(self.hidden[index](F.normalize(features, dim=1)))
        return self.predict(torch.cat([top, hidden], dim=1)).squeeze(1)

    def forward(self, features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """All routers at once for training: features [E, B, D], expert_logits [E, B, C] -> logits [E-1, B]."""
        num_experts = expert_logits.shape[0]
        counts = torch.arange(1, num_experts + 1, dtype=expert_logits.dtype, device=expert_logits.device)
        running_mean = expert_logits.cumsum(0) / counts.view(-1, 1, 1)
        return torch.stack([self.step(i, features[i], running_mean[i]) for i in range(num_experts - 1)])


def router_targets(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[E-1, B] bool: target_i = (experts 0..i ensemble wrong) and (some ensemble 0..j, j > i, right).

    >>> logits = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]], [[0.0, 0.0]]])  # expert 0 wrong, 0+1 right
    >>> router_targets(logits, torch.tensor([1])).squeeze(1).tolist()
    [True, False]
    """
    correct = expert_logits.cumsum(0).argmax(-1) == targets  # [E, B]: ensemble of the first k+1 experts
    right_later = correct.flip(0).cummax(0).values.flip(0)  # [E, B]: some ensemble from k on is right
    return ~correct[:-1] & right_later[1:]


def routing_loss(router_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = POS_WEIGHT):
    """Mean over routers of each router's mean BCE (every router sees the whole batch)."""
    weight = torch.tensor(pos_weight, dtype=router_logits.dtype, device=router_logits.device)
    return F.binary_cross_entropy_with_logits(router_logits, targets.to(router_logits.dtype), pos_weight=weight)


class _FrozenRIDE(nn.Module):
    """Keeps the RIDE model in eval mode (frozen BN, as the official `_hook_before_iter`) while the router trains."""

    def __init__(self, model: nn.Module, router: ExpertRouter):
        super().__init__()
        self.model, self.router = model, router
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self


def train_router(model: nn.Module, router: ExpertRouter, loader, *, epochs: int = 5, lr: float = 0.01,
                 weight_decay: float = 5e-4, pos_weight: float = POS_WEIGHT, device=torch.device("cpu"),
                 sampler=None, progress=lambda batches, desc: batches) -> list:
    """The official stage 2: SGD lr 0.01 Nesterov, wd 5e-4, cosine over 5 epochs (stepped at epoch end), on a
    balanced sampler's loader. Returns one record per epoch (mean loss, share of positive targets)."""
    wrapped = _FrozenRIDE(model, router).to(device).train()
    optimizer = build_sgd(router, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    schedule = build_schedule("cosine", total_epochs=epochs)
    history = []
    for epoch in range(epochs):
        schedule.apply(optimizer, epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        wrapped.train()
        loss_sum, positives, rows, steps = 0.0, 0, 0, 0
        for images, labels in progress(loader, f"router epoch {epoch}"):
            images, labels = move_batch(images, labels, device, channels_last=False)
            with torch.no_grad():
                output = model(images)
            targets = router_targets(output.expert_logits, labels)
            loss = routing_loss(router(output.features, output.expert_logits), targets, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
            positives, rows = positives + int(targets.sum()), rows + targets.numel()
        history.append({"epoch": epoch, "router_loss": loss_sum / max(steps, 1),
                        "positive_share": positives / max(rows, 1), "lr": optimizer.param_groups[0]["lr"]})
    return history


@torch.no_grad()
def routed_forward(model: nn.Module, router: ExpertRouter, images: torch.Tensor, threshold: float = 0.5):
    """(logits [B, C] = mean of the experts each sample went through, experts used [B]); only the rows a router
    sends on are evaluated by the next expert."""
    shared = model.forward_shared(images)
    features, logits = model.forward_expert(shared, 0)
    num_experts, batch = model.num_experts, images.shape[0]
    expert_logits = logits.new_zeros(num_experts, batch, logits.shape[1])
    expert_logits[0] = logits
    active = torch.zeros(batch, num_experts, dtype=torch.bool, device=logits.device)
    active[:, 0] = True
    rows, running_sum = torch.arange(batch, device=logits.device), logits
    for index in range(1, num_experts):
        go_on = torch.sigmoid(router.step(index - 1, features, running_sum / index)) > threshold
        rows, running_sum, shared = rows[go_on], running_sum[go_on], shared[go_on]
        if rows.numel() == 0:
            break
        features, logits = model.forward_expert(shared, index)
        expert_logits[index, rows] = logits
        active[rows, index] = True
        running_sum = running_sum + logits
    return ops.expert_aggregate(expert_logits, active=active), active.sum(1)


@torch.no_grad()
def routed_predict(model, router, loader, threshold: float = 0.5, device=torch.device("cpu")):
    """(logits [N, C], targets [N], experts used [N]) over a loader."""
    model.eval()
    outputs = []
    for images, labels in loader:
        images, labels = move_batch(images, labels, device, channels_last=False)
        logits, used = routed_forward(model, router, images, threshold)
        outputs.append((logits.float().cpu(), labels.cpu(), used.cpu()))
    logits, targets, used = zip(*outputs)
    return torch.cat(logits), torch.cat(targets), torch.cat(used)


def count_macs(run, module: nn.Module) -> int:
    """Multiply-accumulates of convolutions and linear layers inside `module` while `run()` executes, per sample of
    a batch of one (the papers' "FLOPs" are thop MACs, docs/methods.md §3.7)."""
    total = [0]

    def conv(layer, inputs, output):
        kernel = layer.kernel_size[0] * layer.kernel_size[1]
        total[0] += output[0].numel() * (layer.in_channels // layer.groups) * kernel

    def linear(layer, inputs, output):
        total[0] += layer.weight.numel()

    hooks = [layer.register_forward_hook(conv) for layer in module.modules() if isinstance(layer, nn.Conv2d)]
    hooks += [layer.register_forward_hook(linear) for layer in module.modules()
              if isinstance(layer, (nn.Linear, NormedLinear))]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def routed_macs(model: nn.Module, image_shape, experts_used: torch.Tensor) -> dict:
    """Share of samples per number of experts and the resulting mean MACs: shared part + k x one expert
    (router cost, a few thousand MACs, left out as in the official count)."""
    image = torch.zeros(1, *image_shape, device=next(model.parameters()).device)
    model.eval()
    shared_macs = count_macs(lambda: model.forward_shared(image), model)
    shared = model.forward_shared(image)
    expert_macs = count_macs(lambda: model.forward_expert(shared, 0), model)
    counts = torch.bincount(experts_used.long(), minlength=model.num_experts + 1)[1:].double()
    shares = (counts / counts.sum()).tolist()
    mean_macs = shared_macs + expert_macs * sum(share * (k + 1) for k, share in enumerate(shares))
    return {"share_per_num_experts": {k + 1: share for k, share in enumerate(shares)},
            "mean_experts": float(experts_used.double().mean()),
            "mflops_routed": mean_macs / 1e6,
            "mflops_all_experts": (shared_macs + model.num_experts * expert_macs) / 1e6}


@declared
class RouterOptions(Named):
    """The router and its training on the frozen RIDE model (the official stage 2)."""

    top_k: int = option(default_of(ExpertRouter, "top_k"),
                        "top-k running mean logits the router sees (30: CIFAR, ResNet-10; 50: ResNet-50, iNat)", low=1)
    init: str = option(default_of(ExpertRouter, "init"), "kaiming (the official CIFAR router) or default (PyTorch's)",
                       choices=ExpertRouter.INITS)
    epochs: int = option(default_of(train_router, "epochs"), "training epochs (cosine schedule)", low=1)
    batch_size: int = option(128, "batch size", low=1)
    lr: float = option(default_of(train_router, "lr"), "SGD learning rate (Nesterov, momentum 0.9)", low=0)
    weight_decay: float = option(default_of(train_router, "weight_decay"), "SGD weight decay", low=0)
    sampler: SamplerOptions = option(SamplerOptions(name="ride_balanced"), "the training sampler")
    pos_weight: float = option(default_of(train_router, "pos_weight"),
                               "BCE weight of the 'evaluate the next expert' targets", low=0)
    threshold: float = option(default_of(routed_predict, "threshold"),
                              "test time: go on to the next expert when its router's sigmoid > threshold",
                              low=0, high=1)


def reload_router(chosen: dict, model: nn.Module, folder: str, loader, class_counts, device):
    router = ExpertRouter(model.num_experts, model.classifiers[0].weight.shape[0], len(class_counts),
                          top_k=chosen["top_k"])
    router.load_state_dict(torch.load(os.path.join(folder, "router.pt"), map_location=device))
    logits, targets, _ = routed_predict(model, router.to(device), loader, device=device)
    return logits, targets


@register_method("router", RouterOptions, stage=2, needs_model=RIDE, reload=reload_router)
def expert_router(options: RouterOptions, stage: Stage2Context) -> Stage2Result:
    """RIDE's expert-assignment router: each sample stops at the first router saying no (fewer experts, MACs)."""
    model, train_set, device = stage.model, stage.train_set, stage.device
    router = ExpertRouter(model.num_experts, model.classifiers[0].weight.shape[0], train_set.num_classes,
                          top_k=options.top_k, init=options.init).to(device)
    sampler = stage.sampler(options.sampler, options.epochs)
    loader = stage.loader(options.batch_size, sampler)
    history = train_router(model, router, loader, epochs=options.epochs, lr=options.lr,
                           weight_decay=options.weight_decay, pos_weight=options.pos_weight, device=device,
                           sampler=sampler, progress=lambda batches, desc: stage.run.progress(batches, desc=desc))
    for record in history:
        stage.run.log(record)
    logits, targets, used = routed_predict(model, router, stage.plain_loaders["test"], options.threshold, device)
    chosen = {"top_k": router.top_k, **routed_macs(model, tuple(train_set[0][0].shape), used)}
    stage.save("router.pt", router.state_dict())
    shares = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in chosen["share_per_num_experts"].items())
    details = (f"samples per number of experts: {shares}; {chosen['mflops_routed']:.2f} MFLOPs (MACs) routed vs "
               f"{chosen['mflops_all_experts']:.2f} with all experts")
    return Stage2Result(chosen, logits, targets, details=details)
