"""The other client objectives of our seed papers, as pure functions: SmooSeg, PriMaPs-EM and PPAP.

Each one trains the same projection head and ``(C, D)`` prototypes as FUSS's correspondence distillation, so the
server aggregates them unchanged; ``docs/objectives.md`` gives the equations, the defaults and what is simplified.
The training loop that calls these functions is :mod:`fuss_components.trainer`.

Shapes: cached backbone features ``(B, D', h, w)``, head codes ``(B, D, h, w)``, prototypes ``(C, D)``. Features,
codes and prototypes are only ever compared by cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import centered_feature_correlation, correlation

IGNORE = -1  # pseudo label of a position that no mask covers


def cosine_to_prototypes(code: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every code vector ``(B, D, h, w)`` to every prototype ``(C, D)``: ``(B, C, h, w)``."""
    return torch.einsum("bdhw,cd->bchw", F.normalize(code, dim=1), F.normalize(prototypes, dim=1))


@torch.no_grad()
def ema_update_(target: torch.Tensor, source: torch.Tensor, decay: float) -> torch.Tensor:
    """In place: ``target <- decay * target + (1 - decay) * source``; returns ``target``."""
    return target.mul_(decay).add_(source.detach(), alpha=1.0 - decay)


# --------------------------------------------------------------------------------------------------- SmooSeg


def soft_assignment(code: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """SmooSeg's soft labels ``softmax_c(cos(h, p_c) / T)`` of codes ``(B, D, h, w)``: ``(B, C, h, w)``."""
    return (cosine_to_prototypes(code, prototypes) / temperature).softmax(dim=1)


def smoothness_term(feats_a: torch.Tensor, feats_b: torch.Tensor, probs_a: torch.Tensor, probs_b: torch.Tensor,
                    shift: float, pointwise: bool = True) -> torch.Tensor:
    """One SmooSeg smoothness term: ``mean_ij (W_ij - b) * (1 - cos(s_i, s_j))``.

    ``W`` is the closeness of the backbone features (cosine over all position pairs of image a and image b,
    row-centred by STEGO's "pointwise" rule when ``pointwise``), ``s`` the soft assignments. Pairs closer than
    ``b`` are pulled to the same label (their disagreement is penalised), the others pushed apart.
    """
    closeness = centered_feature_correlation(feats_a, feats_b, pointwise)
    disagreement = 1.0 - correlation(probs_a, probs_b)
    return ((closeness - shift) * disagreement).mean()


def student_prototype_loss(code: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SmooSeg's data term: cross-entropy of the student logits ``cos(h, p^s_c)`` (codes detached) against the
    teacher's hard labels ``argmax_c cos(h, p^t_c)``. Only the student prototypes receive a gradient."""
    code = code.detach()
    target = cosine_to_prototypes(code, teacher.detach()).argmax(dim=1)
    return F.cross_entropy(cosine_to_prototypes(code, student), target)


# --------------------------------------------------------------------------------------------------- PriMaPs-EM


def first_principal_direction(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Unit first principal component of ``points`` ``(N, D)`` (centred), oriented toward the side where most
    points lie (a principal component has no sign of its own; this makes the larger region come first).

    Power iteration on the covariance from the point farthest from the mean: deterministic, and on the CPU far
    cheaper than a full SVD per mask. Points that do not vary give their mean direction.
    """
    centred = points - points.mean(dim=0, keepdim=True)
    spread = centred.norm(dim=1)
    if len(points) < 2 or spread.max() <= 1e-6:
        return F.normalize(points.mean(dim=0), dim=0)
    direction = centred[spread.argmax()] / spread.max()
    for _ in range(iterations):
        direction = F.normalize(centred.T @ (centred @ direction), dim=0)
    projection = centred @ direction
    if (projection > 0).sum() < (projection < 0).sum():
        direction = -direction
    return direction


@torch.no_grad()
def principal_mask_proposals(feats: torch.Tensor, threshold: float = 0.4, coverage: float = 0.95,
                             max_masks: int = 16) -> torch.Tensor:
    """PriMaPs of one image's features ``(D', h, w)``: ``(h, w)`` mask ids ``0, 1, ...`` (order of extraction),
    ``IGNORE`` where no mask reaches.

    Repeatedly, on the positions not yet in a mask: take the first principal component of their L2-normalised
    features, the feature nearest to it (the anchor), the cosine of every free position to the anchor, and make
    the positions with ``cos >= threshold * max cos`` the next mask; stop when ``coverage`` of the positions are
    in masks or after ``max_masks`` masks.
    """
    dim, h, w = feats.shape
    points = F.normalize(feats.reshape(dim, h * w).T.float(), dim=1)
    masks = torch.full((h * w,), IGNORE, dtype=torch.long, device=feats.device)
    free = torch.ones(h * w, dtype=torch.bool, device=feats.device)
    for mask_id in range(max_masks):
        if 1.0 - free.float().mean().item() >= coverage or not free.any():
            break
        rest = points[free]
        anchor = rest[(rest @ first_principal_direction(rest)).argmax()]
        similarity = points @ anchor
        top = similarity[free].max()
        member = free & (similarity >= threshold * top)
        masks[member] = mask_id
        free &= ~member
    return masks.reshape(h, w)


def masks_to_pseudo_labels(masks: torch.Tensor, predictions: torch.Tensor, num_classes: int,
                           num_masks: int | None = None) -> torch.Tensor:
    """E-step: every mask of ``masks`` ``(B, h, w)`` gets the majority class of ``predictions`` ``(B, h, w)``
    inside it (ties: the lowest class id); positions outside every mask stay ``IGNORE``. Returns ``(B, h, w)``.
    ``num_masks``: a bound on the mask ids (PriMaPs' ``max_masks``); given, nothing is read back from the device."""
    batch = masks.shape[0]
    if num_masks is None:
        num_masks = int(masks.max().item()) + 1 if masks.numel() else 0
    if num_masks <= 0:
        return torch.full_like(masks, IGNORE)
    covered = masks >= 0
    image = torch.arange(batch, device=masks.device).view(-1, 1, 1).expand_as(masks)
    slot = image * num_masks + masks.clamp(min=0)  # one slot per (image, mask)
    votes = torch.zeros(batch * num_masks * num_classes, dtype=torch.long, device=masks.device)
    votes.index_add_(0, (slot * num_classes + predictions).flatten(), covered.flatten().long())  # uncovered: 0
    mask_class = votes.view(batch * num_masks, num_classes).argmax(dim=1)
    return torch.where(covered, mask_class[slot], torch.full_like(masks, IGNORE))


def class_confidence_weights(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """PriMaPs' class-wise focal weights ``(1 - mean_i p_ic) ** gamma`` over all positions of ``probs``
    ``(B, C, h, w)``: ``(C,)``, detached. Classes the model is already confident about weigh less."""
    mean_confidence = probs.detach().transpose(0, 1).reshape(probs.shape[1], -1).mean(dim=1)
    return (1.0 - mean_confidence) ** gamma


def confidence_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """M-step loss: ``sum_i w_{y_i} * (-log softmax(logits_i)_{y_i}) / #labelled`` over the positions with a
    pseudo label (``labels != IGNORE``), ``w`` from :func:`class_confidence_weights`. ``logits`` ``(B, C, h, w)``,
    ``labels`` ``(B, h, w)``. Zero (still differentiable) when nothing is labelled."""
    weights = class_confidence_weights(logits.softmax(dim=1), gamma)
    labelled = labels != IGNORE
    target = labels.clamp(min=0)
    per_position = F.cross_entropy(logits, target, reduction="none") * weights[target]
    return (per_position * labelled).sum() / labelled.sum().clamp(min=1)


@torch.no_grad()
def spherical_kmeans(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> torch.Tensor:
    """Cosine k-means (Lloyd steps on the unit sphere) of ``points`` ``(N, D)`` started from ``centres``
    ``(C, D)``; a centre that loses all its points stays where it is. Returns unit centres ``(C, D)``."""
    x = F.normalize(points.float(), dim=1)
    c = F.normalize(centres.float(), dim=1)
    for _ in range(iterations):
        assignment = (x @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assignment, x)
        counts = torch.zeros(len(c), dtype=torch.long, device=c.device).index_add_(
            0, assignment, torch.ones_like(assignment))  # not bincount: its output size needs a host sync
        c = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), c)
    return c


# --------------------------------------------------------------------------------------------------- PPAP


@torch.no_grad()
def propagate_proxy_anchors(anchors: torch.Tensor, feats: torch.Tensor, positive_threshold: float,
                            ambiguity_threshold: float, steps: int, sigma_positive: float,
                            sigma_ambiguity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPAP's progressive proxy anchor propagation on backbone features.

    ``anchors`` ``(A, D')`` and ``feats`` ``(N, D')`` (the contrast set) are L2-normalised. The proxy of anchor a
    starts at a with positiveness boundary ``phi = positive_threshold`` and ambiguity edge
    ``psi = ambiguity_threshold``. Each step moves the proxy to the normalised mean of its current positives
    ``{j : cos(proxy, f_j) > phi}`` (toward where positives are dense), and with ``m = 1 - cos(old, new proxy)``
    lowers ``phi`` by ``m / sigma_positive`` and raises ``psi`` by ``m / sigma_ambiguity``: a proxy that moved
    far sits in a dense region and may accept more positives, and needs a wider margin below them.
    Returns ``(proxies (A, D'), phi (A,), psi (A,))``.
    """
    x = F.normalize(feats.float(), dim=1)
    proxy = F.normalize(anchors.float(), dim=1)
    phi = torch.full((len(proxy),), float(positive_threshold), device=x.device)
    psi = torch.full((len(proxy),), float(ambiguity_threshold), device=x.device)
    for _ in range(steps):
        positive = (proxy @ x.T > phi[:, None]).float()
        moved_to = F.normalize(positive @ x, dim=1)
        moved_to = torch.where(positive.sum(dim=1, keepdim=True) > 0, moved_to, proxy)  # no positive: stay
        moved = 1.0 - (proxy * moved_to).sum(dim=1)
        phi = phi - moved / sigma_positive
        psi = psi + moved / sigma_ambiguity
        proxy = moved_to
    return proxy, phi, psi


@torch.no_grad()
def proxy_anchor_partition(anchors: torch.Tensor, feats: torch.Tensor, anchor_index: torch.Tensor,
                           positive_threshold: float, ambiguity_threshold: float, steps: int,
                           sigma_positive: float, sigma_ambiguity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives of every anchor among ``feats`` (``anchors = feats[anchor_index]``).

    With the propagated proxy, boundary ``phi`` and edge ``psi`` (:func:`propagate_proxy_anchors`): positives
    ``cos(proxy, f_j) > phi``, negatives ``cos(proxy, f_j) < psi``; between them is the ambiguity zone, in
    neither set. The anchor itself is in neither. Returns boolean ``(A, N)`` masks ``(positive, negative)``.
    """
    proxy, phi, psi = propagate_proxy_anchors(anchors, feats, positive_threshold, ambiguity_threshold, steps,
                                              sigma_positive, sigma_ambiguity)
    similarity = proxy @ F.normalize(feats.float(), dim=1).T
    positive = similarity > phi[:, None]
    negative = (similarity < psi[:, None]) & ~positive
    rows = torch.arange(len(anchor_index), device=positive.device)
    positive[rows, anchor_index] = False
    negative[rows, anchor_index] = False
    return positive, negative


def proxy_anchor_contrastive_loss(anchor_codes: torch.Tensor, codes: torch.Tensor, positive: torch.Tensor,
                                  negative: torch.Tensor, temperature: float) -> torch.Tensor:
    """Patch-wise supervised-contrastive loss of PPAP on head codes.

    For anchor a with positives P_a and negatives N_a (ambiguous patches are in neither) and ``s = cos / T``:
    ``L_a = -1/|P_a| sum_{p in P_a} [s(a, p) - log sum_{k in P_a + N_a} exp s(a, k)]``, averaged over the anchors
    that have a positive (zero, still differentiable, if none has). ``anchor_codes`` ``(A, D)``, ``codes``
    ``(N, D)``, masks ``(A, N)``.
    """
    num_positive = positive.sum(dim=1)
    keep = num_positive > 0
    logits = F.normalize(anchor_codes, dim=1) @ F.normalize(codes, dim=1).T / temperature
    # an anchor without a positive contrasts with everything (kept finite) and is weighted 0: no branch on the
    # masks' values, which would cost a host sync every step on a GPU
    contrast = (positive | negative) | ~keep[:, None]
    log_denominator = torch.logsumexp(logits.masked_fill(~contrast, float("-inf")), dim=1, keepdim=True)
    log_prob = (logits - log_denominator).masked_fill(~positive, 0.0)
    per_anchor = -log_prob.sum(dim=1) / num_positive.clamp(min=1)
    return (per_anchor * keep).sum() / keep.sum().clamp(min=1)
