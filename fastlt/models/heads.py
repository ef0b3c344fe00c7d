"""Classifier heads: the cosine classifier of RIDE and the four Decoupling stage-2 classifiers
(docs/methods.md §2, §3.1).

Every head maps pooled features [B, D] to logits [B, C]. A plain linear classifier is `torch.nn.Linear`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastlt import ops


class NormedLinear(nn.Module):
    """RIDE's cosine classifier: scale * cos(x, w_j), no bias.

    The weight keeps the official (in_features, out_features) layout and init, columns of about unit norm.
    `scale` defaults to 1 because RIDE applies s = 30 in the model ("moved from the loss").

    >>> head = NormedLinear(48, 100)
    >>> head(torch.randn(2, 48)).abs().max() <= 1.0
    tensor(True)
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(features, dim=1) @ F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        in_features, out_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, scale={self.scale}"


class TauNormLinear(nn.Module):
    """tau-normalised classifier: logits = x @ (W / ||W_row||^tau)^T, bias dropped (Decoupling tau-norm).

    Built post hoc from a trained nn.Linear; nothing is trained. `tau` can be changed after construction.

    >>> head = TauNormLinear.from_linear(nn.Linear(64, 10), tau=1.0)
    >>> head(torch.randn(2, 64)).shape
    torch.Size([2, 10])
    """

    def __init__(self, weight: torch.Tensor, tau: float):
        super().__init__()
        self.tau = tau
        self.register_buffer("weight", weight.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, tau: float) -> "TauNormLinear":
        return cls(linear.weight, tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ ops.tau_normalize(self.weight, self.tau).t()

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, tau={self.tau}"


class LearnableWeightScaling(nn.Module):
    """LWS: logits = scales * (x W^T + b) with W, b frozen from stage 1 and one trainable scale per class.

    The scale multiplies the whole logit, bias included; scales start at 1 (official TauNormClassifier).

    >>> head = LearnableWeightScaling.from_linear(nn.Linear(64, 10))
    >>> [name for name, _ in head.named_parameters()]
    ['scales']
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.scales = nn.Parameter(torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LearnableWeightScaling":
        bias = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
        return cls(linear.weight, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias) * self.scales

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}"


class NearestClassMean(nn.Module):
    """NCM: score each class by its distance to the class mean of transformed training features.

    feature_transform: "cl2n" (default: subtract the training mean, then L2-normalise), "l2n" (normalise only),
    "none". distance: "l2" -> -||x - c_j||^2 (default); "cos" -> x . c_j / D, exactly as the official
    KNNClassifier (centroids are not re-normalised, so this is a scaled dot product).

    >>> head = NearestClassMean(feature_dim=4, num_classes=2)
    >>> head.fit(torch.eye(4)[:2].repeat(3, 1), torch.tensor([0, 1] * 3))
    >>> head(torch.eye(4)[:2]).argmax(1)
    tensor([0, 1])
    """

    def __init__(self, feature_dim: int, num_classes: int, feature_transform: str = "cl2n", distance: str = "l2"):
        super().__init__()
        if feature_transform not in ("cl2n", "l2n", "none"):
            raise ValueError(
                f"NearestClassMean: feature_transform must be cl2n, l2n or none, got {feature_transform!r}"
            )
        if distance not in ("l2", "cos"):
            raise ValueError(f"NearestClassMean: distance must be l2 or cos, got {distance!r}")
        self.feature_transform = feature_transform
        self.distance = distance
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("centroids", torch.zeros(num_classes, feature_dim))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_transform == "cl2n":
            features = features - self.feature_mean
        if self.feature_transform in ("cl2n", "l2n"):
            features = features / features.norm(dim=1, keepdim=True)
        return features

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Sets the mean over ALL training features, then each class's mean of transformed features."""
        self.feature_mean.copy_(features.mean(dim=0))
        transformed = self.transform(features.to(self.centroids.dtype))
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, transformed)
        counts = torch.bincount(labels, minlength=self.centroids.shape[0]).clamp_min(1)
        self.centroids.copy_(sums / counts[:, None].to(sums.dtype))

    def extra_repr(self) -> str:
        num_classes, feature_dim = self.centroids.shape
        return (f"feature_dim={feature_dim}, num_classes={num_classes}, feature_transform={self.feature_transform!r}, "
                f"distance={self.distance!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        transformed = self.transform(features)
        if self.distance == "cos":
            return transformed @ self.centroids.t() / transformed.shape[1]
        return -torch.cdist(transformed, self.centroids).square()


def create_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    """Builds a trainable head by config name: "linear" (nn.Linear with bias) or "normed" (NormedLinear).

    Stage-2 heads are built from a trained linear layer instead: TauNormLinear.from_linear,
    LearnableWeightScaling.from_linear, NearestClassMean(...).fit(features, labels).
    """
    if name == "linear":
        return nn.Linear(in_features, num_classes, **kwargs)
    if name == "normed":
        return NormedLinear(in_features, num_classes, **kwargs)
    raise ValueError(f"create_head: unknown head {name!r}; expected 'linear' or 'normed'")
