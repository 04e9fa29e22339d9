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


# ------------------------------------------------------------------ the same terms on sampled points of token maps
# Training keeps every view as a token map ``(h, w, D')``. The loss only reads the codes at the 11 x 11 sampled
# points, and bilinear sampling reads at most four tokens per point; the head acts on each token alone (1 x 1
# convolutions, ReLU per token), so the code at a point is exactly the bilinear mix of the four tokens' codes:
# the head need not run on the tokens no point reads (``bilinear_corners``, ``gather_points``).


def bilinear_corners(coords: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``coords`` ``(N, g, g, 2)`` in [-1, 1] (``grid_sample``'s x, y with ``align_corners=True``): the flat
    index ``y * w + x`` of the four tokens each point reads, ``(N, g*g, 4)``, and their bilinear weights."""
    x = (coords[..., 0].flatten(1) + 1) / 2 * (w - 1)
    y = (coords[..., 1].flatten(1) + 1) / 2 * (h - 1)
    x0, y0 = x.floor().clamp(0, w - 1), y.floor().clamp(0, h - 1)
    ax, ay = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    index = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=-1)
    weight = torch.stack([(1 - ax) * (1 - ay), ax * (1 - ay), (1 - ax) * ay, ax * ay], dim=-1)
    return index, weight


def gather_points(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(N, P, C)`` of the rows of ``values`` ``(M, C)`` that ``index`` ``(N, P, 4)`` names, with
    ``weight`` ``(N, P, 4)``: one weighted bag of four rows per point (no ``(N, P, 4, C)`` intermediate)."""
    n, p, corners = index.shape
    out = F.embedding_bag(index.reshape(-1, corners), values,
                          per_sample_weights=weight.reshape(-1, corners).to(values.dtype), mode="sum")
    return out.view(n, p, values.shape[1])


def point_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation of every point of ``a`` ``(B, P, C)`` with every point of ``b`` ``(B, Q, C)``:
    ``(B, P, Q)`` (:func:`correlation` on sampled points)."""
    return F.normalize(a, dim=-1, eps=1e-10) @ F.normalize(b, dim=-1, eps=1e-10).transpose(1, 2)


def point_correspondence_term(fd: torch.Tensor, cd: torch.Tensor, shift: float) -> torch.Tensor:
    """:func:`correspondence_term` from a centered feature correlation ``fd`` and a code correlation ``cd`` of the
    same shape."""
    return -(cd.clamp(min=0) * (fd - shift)).mean()


def center_points(fd: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """STEGO's pointwise centering of a feature correlation ``(..., P, Q)`` over its last (second image's) axis."""
    return fd - fd.mean(dim=-1, keepdim=True) + fd.mean() if pointwise else fd


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
