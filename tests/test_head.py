"""Tests of fuss_components.head: the projection head, cosine cluster logits, and the split of a model state
into the shared head and centroids."""

from __future__ import annotations

import math

import pytest
import torch

from fuss_components.head import FussModel


def test_projection_head_is_linear_plus_nonlinear_branch():
    from fuss_components.head import ProjectionHead, join_state, split_state

    head = ProjectionHead(in_dim=6, dim=3, dropout=0.0).eval()
    x = torch.randn(2, 6, 4, 5)
    expected = head.linear(x) + head.nonlinear[2](torch.relu(head.nonlinear[0](x)))
    assert torch.allclose(head(x), expected)
    assert head(x).shape == (2, 3, 4, 5)
    model = FussModel(6, 3, num_clusters=4)
    parts = split_state(model.state_dict())
    assert parts[1].shape == (4, 3) and set(join_state(*parts)) == set(model.state_dict())


def test_cluster_logits_are_the_cosines_of_the_code_to_each_centroid():
    """A head that is the identity (linear branch = I, nonlinear branch = 0): the code at a position with features
    (3, 4) is (0.6, 0.8); the centroids (1, 0), (0, 2), (-1, -1) give cosines 0.6, 0.8, -1.4 / sqrt(2)."""
    model = FussModel(in_dim=2, dim=2, num_clusters=3, dropout=0.0).eval()
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        model.head.linear.bias.zero_()
        model.head.nonlinear[2].weight.zero_()
        model.head.nonlinear[2].bias.zero_()
        model.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    feats = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)
    logits = model.cluster_logits(feats)
    assert logits.shape == (1, 3, 1, 1)
    assert logits.flatten().tolist() == pytest.approx([0.6, 0.8, -1.4 / math.sqrt(2)], abs=1e-6)


def test_split_and_join_state_round_trip_the_same_tensors():
    from fuss_components.head import join_state, split_state

    state = FussModel(in_dim=6, dim=3, num_clusters=4).state_dict()
    head, centroids = split_state(state)
    assert sorted(head) == ["linear.bias", "linear.weight", "nonlinear.0.bias", "nonlinear.0.weight",
                            "nonlinear.2.bias", "nonlinear.2.weight"]
    assert centroids is state["centroids"] and tuple(centroids.shape) == (4, 3)
    assert head["linear.weight"] is state["head.linear.weight"]
    joined = join_state(head, centroids)
    assert sorted(joined) == sorted(state) and all(joined[k] is state[k] for k in state)
    with pytest.raises(KeyError, match="centroids"):
        split_state({"head.linear.bias": torch.zeros(3)})
