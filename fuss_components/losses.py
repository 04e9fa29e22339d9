"""FUSS local objectives: correspondence distillation (paper Eq. 6), centroid loss (Eq. 5), FedProx, MOON."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_grid(batch: int, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random sampling coordinates in [-1, 1]: ``(batch, grid, grid, 2)`` for ``grid_sample``."""
    return torch.rand(batch, grid, grid, 2, generator=generator) * 2 - 1


def sample_at(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``maps`` (B, C, h, w) at ``coords`` (B, g, g, 2) -> ``(B, C, g, g)``."""
    return F.grid_sample(maps, coords.to(maps.device, maps.dtype), mode="bilinear", align_corners=True)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation of every position of ``a`` (B, C, h, w) with every position of ``b`` (B, C, i, j):
    ``(B, h, w, i, j)``."""
    return torch.einsum("bchw,bcij->bhwij", F.normalize(a, dim=1, eps=1e-10), F.normalize(b, dim=1, eps=1e-10))


def centered_feature_correlation(f1: torch.Tensor, f2: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """Feature correlation A; with ``pointwise`` its mean over the second image's positions is subtracted and
    the global mean restored (STEGO's "pointwise" centering)."""
    fd = correlation(f1, f2)
    if pointwise:
        fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    return fd


def correspondence_term(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float,
                        pointwise: bool = True) -> torch.Tensor:
    """One term of Eq. 6: ``mean(-clamp(Q, min=0) * (A - b))`` with A from features, Q from head codes."""
    fd = centered_feature_correlation(f1, f2, pointwise)
    cd = correlation(c1, c2)
    return -(cd.clamp(min=0) * (fd - shift)).mean()


def centroid_loss(code: torch.Tensor, centroids: torch.Tensor, inter_weight: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5 on detached, L2-normalised codes ``(B, D, h, w)`` and centroids ``(C, D)``.

    Intra term ``-mean(max_c cos(h, m_c))`` (hard assignment) plus ``inter_weight`` times the mean cosine
    between distinct centroids. Returns (loss, assignment ``(B, h, w)``, worst-explained score
    ``max_c cos`` per position ``(B, h, w)``).
    """
    inner = torch.einsum("bdhw,cd->bchw", F.normalize(code.detach(), dim=1), F.normalize(centroids, dim=1))
    best, assignment = inner.max(dim=1)
    loss = -best.mean()
    if inter_weight and centroids.shape[0] > 1:
        normed = F.normalize(centroids, dim=1)
        sim = normed @ normed.T
        off_diagonal = sim[~torch.eye(len(sim), dtype=torch.bool, device=sim.device)]
        loss = loss + inter_weight * off_diagonal.mean()
    return loss, assignment, best.detach()


def fedprox_term(module: nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx proximal term ``mu/2 * ||theta - theta_global||^2`` over ``module``'s parameters."""
    total = sum(((p - global_params[name]) ** 2).sum() for name, p in module.named_parameters())
    return 0.5 * mu * total


def moon_term(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, tau: float) -> torch.Tensor:
    """MOON model-contrastive loss per position: pull the local code toward the global model's code and away
    from the previous local model's: ``-log(e^{s(z,zg)/tau} / (e^{s(z,zg)/tau} + e^{s(z,zp)/tau}))``."""
    sim_global = F.cosine_similarity(z, z_global, dim=1) / tau
    sim_previous = F.cosine_similarity(z, z_previous, dim=1) / tau
    logits = torch.stack([sim_global, sim_previous], dim=1)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def quantile_shift(fd: torch.Tensor, attract_fraction: float, max_values: int = 1_000_000,
                   generator: torch.Generator | None = None) -> float:
    """The shift b such that ``attract_fraction`` of the correlation values satisfy A - b > 0."""
    values = fd.flatten().float()
    if values.numel() > max_values:
        values = values[torch.randperm(values.numel(), generator=generator)[:max_values]]
    return float(torch.quantile(values, 1.0 - attract_fraction))
