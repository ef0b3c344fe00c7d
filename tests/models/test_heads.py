"""Every classifier head against a hand computation."""

import pytest
import torch
from torch import nn

from fastlt.models import LearnableWeightScaling, NearestClassMean, NormedLinear, TauNormLinear, create_head


def test_normed_linear_is_scaled_cosine_with_official_layout():
    torch.manual_seed(0)
    head = NormedLinear(6, 4, scale=30.0)
    assert head.weight.shape == (6, 4)  # (in, out), as RIDE's checkpoints
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(4), atol=1e-3, rtol=0)
    features = torch.randn(5, 6)
    cosine = torch.nn.functional.cosine_similarity(features[:, :, None], head.weight[None], dim=1)
    torch.testing.assert_close(head(features), 30.0 * cosine)
    assert sum(p.numel() for p in head.parameters()) == 24  # no bias


def test_tau_norm_linear_drops_bias_and_divides_rows():
    torch.manual_seed(0)
    linear = nn.Linear(8, 3)
    features = torch.randn(4, 8)
    no_bias = features @ linear.weight.t()
    torch.testing.assert_close(TauNormLinear.from_linear(linear, tau=0.0)(features), no_bias)
    head = TauNormLinear.from_linear(linear, tau=1.0)
    torch.testing.assert_close(head(features), no_bias / linear.weight.norm(dim=1))
    head.tau = 0.5
    torch.testing.assert_close(head(features), no_bias / linear.weight.norm(dim=1).sqrt())
    assert list(head.parameters()) == []


def test_lws_scales_the_whole_logit_and_trains_only_scales():
    torch.manual_seed(0)
    linear = nn.Linear(8, 3)
    head = LearnableWeightScaling.from_linear(linear)
    features = torch.randn(4, 8)
    torch.testing.assert_close(head(features), linear(features))  # scales start at 1
    with torch.no_grad():
        head.scales.copy_(torch.tensor([2.0, 0.5, 1.0]))
    torch.testing.assert_close(head(features), linear(features) * torch.tensor([2.0, 0.5, 1.0]))
    head(features).sum().backward()
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["scales"]
    assert head.scales.grad is not None


def test_ncm_centres_normalises_and_uses_unnormalised_centroids():
    features = torch.tensor([[3.0, 1.0], [5.0, 1.0], [1.0, 3.0], [1.0, 7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    head = NearestClassMean(feature_dim=2, num_classes=2)
    head.fit(features, labels)
    mean = features.mean(0)
    transformed = (features - mean) / (features - mean).norm(dim=1, keepdim=True)
    centroids = torch.stack([transformed[:2].mean(0), transformed[2:].mean(0)])
    torch.testing.assert_close(head.feature_mean, mean)
    torch.testing.assert_close(head.centroids, centroids)
    queries = torch.tensor([[6.0, 0.0], [0.0, 9.0]])
    query_transformed = (queries - mean) / (queries - mean).norm(dim=1, keepdim=True)
    expected_l2 = -((query_transformed[:, None] - centroids[None]) ** 2).sum(-1)
    torch.testing.assert_close(head(queries), expected_l2)
    assert head(queries).argmax(1).tolist() == [0, 1]
    cosine_head = NearestClassMean(2, 2, distance="cos")
    cosine_head.fit(features, labels)
    torch.testing.assert_close(cosine_head(queries), query_transformed @ centroids.t() / 2)


def test_ncm_rejects_unknown_options_and_create_head():
    with pytest.raises(ValueError, match="distance"):
        NearestClassMean(2, 2, distance="manhattan")
    assert isinstance(create_head("linear", 4, 3), nn.Linear)
    assert create_head("normed", 4, 3, scale=30.0).scale == 30.0
    with pytest.raises(ValueError, match="unknown head"):
        create_head("mlp", 4, 3)
