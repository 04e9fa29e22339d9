"""The trained and shared part of FUSS: the projection head S and the class centroids M."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_PREFIX = "head."
CENTROIDS_KEY = "centroids"


class ProjectionHead(nn.Module):
    """STEGO's "nonlinear" head: ``conv1x1(D'->D) + conv1x1(D'->D') -> ReLU -> conv1x1(D'->D)``, with
    Dropout2d on the input features."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = self.dropout(feats)
        return self.linear(feats) + self.nonlinear(feats)

    def project(self, tokens: torch.Tensor, scale: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """The head on feature vectors ``(..., D')`` -> codes ``(..., D)``: the 1 x 1 convolutions as matrix
        products on token rows, what training computes. ``scale``: the
        input dropout's mask (broadcast to ``tokens``); None applies none (the caller draws it per view, as
        Dropout2d does per map). ``dtype``: compute in it (e.g. bfloat16; inputs and weights cast once each, the
        gradients reach the float32 parameters); the result is in that dtype."""
        dtype = dtype or tokens.dtype
        tokens = tokens.to(dtype)
        if scale is not None:
            tokens = torch.mul(tokens, scale.to(dtype))
        first, last = self.nonlinear[0], self.nonlinear[2]

        def weights(conv):
            return conv.weight.flatten(1).to(dtype), conv.bias.to(dtype)

        hidden = F.relu(F.linear(tokens, *weights(first)))
        return F.linear(tokens, *weights(self.linear)) + F.linear(hidden, *weights(last))

    def dropout_scale(self, views: int, device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Dropout2d's mask for ``views`` feature maps, ``(views, D')`` (scaled by 1 / (1 - p)): one draw per map
        and channel; None in eval mode or with p = 0."""
        p = self.dropout.p
        if not self.training or p == 0:
            return None
        keep = torch.empty(views, self.linear.in_channels, device=device).bernoulli_(1 - p)
        return keep.div_(1 - p).to(dtype)


class FussModel(nn.Module):
    """Head plus centroids ``(C, D)``; its ``state_dict`` (``head.*`` and ``centroids``) is what travels."""

    def __init__(self, in_dim: int, dim: int, num_clusters: int, dropout: float = 0.1):
        super().__init__()
        self.head = ProjectionHead(in_dim, dim, dropout)
        self.centroids = nn.Parameter(torch.randn(num_clusters, dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Code map ``(B, D, h, w)`` of features ``(B, D', h, w)``."""
        return self.head(feats)

    @torch.no_grad()
    def cluster_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every code vector to every centroid: ``(B, C, h, w)``."""
        code = F.normalize(self.head(feats), dim=1)
        return torch.einsum("bdhw,cd->bchw", code, F.normalize(self.centroids, dim=1))


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``FussModel`` state -> (head parameters without the ``head.`` prefix, centroids)."""
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if CENTROIDS_KEY not in state:
        raise KeyError(f"model state has no {CENTROIDS_KEY!r} entry")
    return head, state[CENTROIDS_KEY]


def join_state(head: dict[str, torch.Tensor], centroids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state`."""
    state = {HEAD_PREFIX + k: v for k, v in head.items()}
    state[CENTROIDS_KEY] = centroids
    return state
