"""Per-class constants of the long-tailed losses, one function per formula (docs/methods.md 3.2, 4.3).

Every backend (eager reference, C++ CPU, CUDA, Triton) receives these [C] tables from here, so each formula has
exactly one definition. They are computed in fp64 from the class counts and cast by the caller.
"""

import torch


def check_class_counts(op: str, class_counts: torch.Tensor, num_classes: int, why_positive: str = "") -> None:
    """ValueError unless ``class_counts`` is a [C] tensor of positive, finite counts (``why_positive``: what a zero
    count would break, for the message)."""
    if not isinstance(class_counts, torch.Tensor):
        raise TypeError(f"{op}: class_counts must be a torch.Tensor, got {type(class_counts).__name__}")
    if tuple(class_counts.shape) != (num_classes,):
        raise ValueError(f"{op}: class_counts must be [C]=[{num_classes}], got {tuple(class_counts.shape)}")
    if torch.compiler.is_compiling():
        return  # value checks would be data-dependent graph breaks; the eager call checked the same counts
    counts = class_counts.double()
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        bad = counts[~(torch.isfinite(counts) & (counts > 0))][0].item()
        reason = f" ({why_positive})" if why_positive and bad == 0 else ""
        raise ValueError(f"{op}: class_counts must be positive and finite{reason}, got {bad}")


def class_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """pi_j = n_j / sum(n)."""
    counts = class_counts.double()
    return counts / counts.sum()


def ldam_margins(class_counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """LDAM margins m_j = max_margin * n_j^(-1/4) / max_i n_i^(-1/4) (the rarest class gets max_margin).

    >>> ldam_margins(torch.tensor([100.0, 1.0]), 0.5)
    tensor([0.1581, 0.5000], dtype=torch.float64)
    """
    quarter_power = class_counts.double() ** -0.25
    return max_margin * quarter_power / quarter_power.max()


def drw_weights(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Deferred re-weighting by effective numbers: w_j = (1 - beta) / (1 - beta^n_j), normalised to sum to C.

    >>> drw_weights(torch.tensor([100.0, 1.0]), 0.9999).sum()
    tensor(2., dtype=torch.float64)
    """
    counts = class_counts.double()
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.full_like(counts, beta), counts))
    return weights / weights.sum() * counts.numel()


def ride_temperatures(class_counts: torch.Tensor, temperature_factor: float, base_temperature: float,
                      drw: bool) -> torch.Tensor:
    """RIDE's per-class diversity temperatures T_j (docs/methods.md 3.2b).

    With DRW on: T_j = base * t_j, t_j = (g*C*pi_j + 1 - g) / max_i(g*C*pi_i + 1 - g) with g = temperature_factor;
    before DRW every class has T_j = base.

    >>> ride_temperatures(torch.tensor([100.0, 1.0]), 0.05, 1.0, drw=True)
    tensor([1.0000, 0.9066], dtype=torch.float64)
    """
    num_classes = class_counts.numel()
    if not drw:
        return torch.full((num_classes,), float(base_temperature), dtype=torch.float64, device=class_counts.device)
    unnormalised = temperature_factor * num_classes * class_prior(class_counts) + 1.0 - temperature_factor
    return base_temperature * unnormalised / unnormalised.max()


def prior_logit_shifts(class_counts: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Logit adjustment of each expert: shift[k, j] = tau_k * log(pi_j) ([E, C]; Balanced Softmax: tau = 1).

    >>> prior_logit_shifts(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0]))
    tensor([[-0.2877, -1.3863],
            [-0.0000, -0.0000]], dtype=torch.float64)
    """
    return taus.double().to(class_counts.device)[:, None] * class_prior(class_counts).log()[None, :]
