"""Local training of head and centroids on one site's cached features (the client half of Algorithm 1).

FLARE executors and the in-process runners call the same :class:`LocalTrainer`, so they run the same math.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from .config import FussConfig
from .disclosure import DisclosurePolicy, Release, Support
from .head import CENTROIDS_KEY, FussModel
from .losses import (bilinear_corners, center_points, centered_feature_correlation, centroid_loss, fedprox_term,
                     gather_points, moon_term, point_correspondence_term, quantile_shift,
                     random_grid, sample_at)
from .views import VIEWS_PER_IMAGE, Prefetcher, TrainFeatures, ViewRows
from .objectives import (confidence_focal_loss, cosine_to_prototypes, ema_update_, masks_to_pseudo_labels,
                         principal_mask_proposals, proxy_anchor_contrastive_loss, proxy_anchor_partition,
                         smoothness_term, soft_assignment, spherical_kmeans, student_prototype_loss)

log = logging.getLogger(__name__)

ROW_BLOCK = 512  # partner token rows are padded to a multiple of this (see _StegoStep.head_loss)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when one is present (the first one this process sees: FLARE and the simulator give
    each site its own through ``CUDA_VISIBLE_DEVICES``), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``train.precision`` -> the dtype of the head's matrix products in training: ``auto`` = bfloat16 where the
    device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor copied to the CPU: what leaves the training device, once a round (the state, the metrics)."""
    return tensor.detach().to("cpu")


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process for the same parts (Python's hash() is salted)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class Shifts:
    self: float
    knn: float
    random: float


@dataclass
class LocalResult:
    """What a site returns after a round: its model state, sample count (images) and training metrics."""

    state: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    release: Release | None = None  # how the sent centroids were released (fuss_components.disclosure)


@dataclass
class StepBatch:
    """What one training step read: the query views ``q`` as float32 tokens ``(B, h, w, D')``, their codes
    ``(B, h, w, D)``, the queries' dropout mask ``(B, D')`` (None without dropout), and the tokens of the
    objective's partner views (None when it has none)."""

    q: torch.Tensor
    tokens_q: torch.Tensor
    code_tokens: torch.Tensor
    scale: torch.Tensor | None
    partners: ViewRows | None


class LocalTrainer:
    """Runs local steps of FUSS on one site's :class:`TrainFeatures`, with the client objective
    ``train.objective`` (one step class per objective, see :data:`OBJECTIVE_STEPS`).

    Stateful across rounds only in what the algorithm needs: the calibrated shifts (stego), the PriMaPs mask
    proposals of the views seen so far (a pure function of the cached features), and the site's previous local
    model (MOON's negative; the kept head/centroids when the E/C switches are off).
    """

    def __init__(self, feats: TrainFeatures, cfg: FussConfig, site: str, num_clusters: int,
                 policy: DisclosurePolicy | None = None):
        if feats.num_views < 2:
            raise ValueError(f"site {site!r} has {feats.num_views} training views; at least 2 are needed")
        self.cfg = cfg
        self.site = site
        self.num_clusters = num_clusters
        self.policy = policy or DisclosurePolicy()  # the site's: how its centroids leave (release_centroids)
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.in_dim, self.h, self.w = feats.geometry
        if self.device.type == "cuda" and not feats.streamed and _fits_on_device(feats.nbytes, self.device):
            # a device-side copy of the views when it fits half the free GPU memory; else batches are copied
            feats = TrainFeatures(feats.store.to(self.device), feats.view_image_ids, feats.knn)
        self.feats = feats
        self._knn = feats.knn
        self.shifts: Shifts | None = None
        self.previous_state: dict[str, torch.Tensor] | None = None
        self.mask_proposals: dict[int, torch.Tensor] = {}  # view index -> PriMaPs mask ids (h, w), on the CPU

    def steps_per_round(self) -> int:
        return self.cfg.round_steps(self.feats.num_images)

    def plan(self, objective, steps: int, seed: int) -> list[list[torch.Tensor]]:
        """The views every step of a round reads, drawn before the round (so a streamed store can read them
        ahead): per step ``[queries]``, or ``[queries, partners]`` with the objective's partner views (stego: the
        kNN views, then the random views). Local
        epochs: the queries walk a seeded permutation of the views, a new one each epoch."""
        gen = torch.Generator().manual_seed(seed)
        n, b = self.feats.num_views, self.cfg.train.batch_size
        order, cursor, plan = torch.randperm(n, generator=gen), 0, []
        for _ in range(steps):
            if cursor + b > n:  # next local epoch
                order, cursor = torch.randperm(n, generator=gen), 0
            q = order[cursor:cursor + b]
            cursor += b
            partners = objective.partners(q, gen)
            plan.append([q, torch.cat(partners)] if partners else [q])
        return plan

    def calibrate(self, num_queries: int = 32) -> Shifts:
        """Fixed shifts, or label-free quantile shifts from this site's own feature correlations."""
        loss = self.cfg.loss
        if loss.shift_mode == "fixed":
            return Shifts(loss.self_shift, loss.knn_shift, loss.random_shift)
        gen = torch.Generator().manual_seed(stable_seed(self.cfg.train.seed, self.site, "calibrate"))
        n = self.feats.num_views
        q = torch.randint(n, (num_queries,), generator=gen)
        pos = self._knn[q, torch.randint(self._knn.shape[1], (num_queries,), generator=gen)]
        neg = _random_others(q, n, 1, gen)[:, 0]
        g = loss.grid
        fq = sample_at(self._batch(q), random_grid(num_queries, g, gen))
        fp = sample_at(self._batch(pos), random_grid(num_queries, g, gen))
        fn = sample_at(self._batch(neg), random_grid(num_queries, g, gen))
        shifts = Shifts(
            quantile_shift(centered_feature_correlation(fq, fq, loss.pointwise), loss.self_attract, generator=gen),
            quantile_shift(centered_feature_correlation(fq, fp, loss.pointwise), loss.knn_attract, generator=gen),
            quantile_shift(centered_feature_correlation(fq, fn, loss.pointwise), loss.random_attract,
                           generator=gen),
        )
        log.info("site %s: calibrated shifts self=%.4f knn=%.4f random=%.4f", self.site, shifts.self, shifts.knn,
                 shifts.random)
        return shifts

    def _batch(self, index: torch.Tensor) -> torch.Tensor:
        """Views ``index`` as float32 feature maps ``(B, D', h, w)`` on the training device."""
        return self.feats.views(index, self.device)

    def project(self, model: FussModel, tokens: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The head's codes (float32) of feature vectors ``(..., D')`` with dropout ``scale`` (``(..., D')``), its
        matrix products in ``train.precision``."""
        return model.head.project(tokens, scale, self.precision).float()

    def train(self, global_state: dict[str, torch.Tensor], round_idx: int, steps: int | None = None) -> LocalResult:
        """Start from the global model (or this site's own head/centroids when E/C are off), run the local
        steps of the configured objective and return the new local state. Deterministic for (seed, site, round)."""
        tc, fed = self.cfg.train, self.cfg.federation
        steps = steps or self.steps_per_round()
        if tc.objective == "stego" and self.shifts is None:
            self.shifts = self.calibrate()
        seed = stable_seed(tc.seed, self.site, round_idx)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)

        start_state = {k: v.detach().clone().float() for k, v in global_state.items()}
        if self.previous_state is not None:
            for key, value in self.previous_state.items():
                keep = fed.aggregate_centroids is False if key == "centroids" else fed.average_head is False
                if keep:
                    start_state[key] = value.clone()
        model = FussModel(self.in_dim, tc.dim, self.num_clusters, tc.dropout)
        model.load_state_dict(start_state)
        model.to(self.device).train()
        objective = OBJECTIVE_STEPS[tc.objective](self)
        objective.begin_round(model, round_idx)
        opt_head = torch.optim.Adam(dict(model.head.named_parameters()).values(), lr=objective.lr_head)

        global_head = previous_head = None
        global_params = {}
        if tc.fedprox_mu > 0 or tc.moon_weight > 0:
            global_head = copy.deepcopy(model.head).eval().requires_grad_(False)
            global_head.load_state_dict({k[5:]: v for k, v in global_state.items() if k.startswith("head.")})
            global_params = {k: v.detach() for k, v in global_head.named_parameters()}
        if tc.moon_weight > 0 and self.previous_state is not None:
            previous_head = copy.deepcopy(global_head)
            previous_head.load_state_dict({k[5:]: v for k, v in self.previous_state.items() if k.startswith("head.")})

        plan = self.plan(objective, steps, stable_seed(seed, "views"))
        totals: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        # streamed views are read ahead on a thread, whole; from memory only the queries are copied, the partners'
        # tokens are read where they are
        streamed = self.feats.streamed
        reads = plan if streamed else [item[:1] for item in plan]
        for step, (item, batch) in enumerate(zip(plan, Prefetcher(self.feats.store, reads, 2 if streamed else 0))):
            q = item[0]
            tokens_q = batch[0].to(self.device, non_blocking=True).float()  # (B, h, w, D')
            scale = model.head.dropout_scale(len(q), self.device)
            code_tokens = self.project(model, tokens_q, None if scale is None else scale[:, None, None, :])
            feats_q, code_q = tokens_q.permute(0, 3, 1, 2), code_tokens.permute(0, 3, 1, 2)
            partners = None
            if len(item) > 1:
                partners = ViewRows(self.feats.store, item[1], batch[1] if streamed else None)
            step_batch = StepBatch(q, tokens_q, code_tokens, scale, partners)
            loss, terms = objective.head_loss(model, q, feats_q, code_q, gen, step_batch)
            if tc.fedprox_mu > 0:
                terms["loss_fedprox"] = fedprox_term(model.head, global_params, tc.fedprox_mu)
                loss = loss + terms["loss_fedprox"]
            if previous_head is not None:
                with torch.no_grad():
                    z_global, z_previous = global_head(feats_q), previous_head(feats_q)
                terms["loss_moon"] = moon_term(code_q, z_global, z_previous, tc.moon_tau)
                loss = loss + tc.moon_weight * terms["loss_moon"]
            opt_head.zero_grad(set_to_none=True)
            loss.backward()
            opt_head.step()
            terms.update(objective.update_prototypes(model, code_q, step))
            for key, value in terms.items():  # summed on the device: no host sync per step
                value = value.detach()
                totals[key] = totals[key] + value if key in totals else value

        if objective.refits_centroids and tc.centroids == "kmeans":
            self.refit_centroids(model, stable_seed(seed, "refit"))
        release = self.release_centroids(model, global_state[CENTROIDS_KEY], stable_seed(seed, "release"))
        state = {k: to_host(v).clone() for k, v in model.state_dict().items()}
        self.previous_state = state
        metrics = {k: float(to_host(v)) / steps for k, v in totals.items()}  # the round's one read of them
        metrics.update(steps=float(steps), clusters_reseeded=float(objective.reseeded),
                       clusters_used=float(self.clusters_used(model)),
                       centroids_replaced=float(len(release.replaced)), seconds=time.perf_counter() - started)
        return LocalResult(state, self.feats.num_images, metrics, release)

    @torch.no_grad()
    def release_centroids(self, model: FussModel, received: torch.Tensor, seed: int) -> Release:
        """Replace ``model.centroids`` by what may leave the site (``disclosure.release_centroids``), counted on
        every position of a seeded sample of the site's views (at most ``policy.support_codes`` codes)."""
        gen = torch.Generator().manual_seed(seed)
        h, w = self.h, self.w
        count = min(self.feats.num_views, max(1, math.ceil(self.policy.support_codes / (h * w))))
        views = torch.randperm(self.feats.num_views, generator=gen)[:count]
        # float64, so that which centroid a code chooses does not depend on the summation order of the machine's
        # thread count (the FLARE sites and the in-process runner give the same result)
        head = copy.deepcopy(model.head).double().eval()
        support = Support(model.centroids, keep_codes=self.policy.max_code_cosine < 1.0)
        chunk = 16
        for part, feats in zip(views.split(chunk), self.feats.chunks(views, chunk, self.device)):
            codes = head.project(feats.permute(0, 2, 3, 1).double()).flatten(0, 2)
            support.add(codes, (part // VIEWS_PER_IMAGE).repeat_interleave(h * w))
        released, release = support.release(received, self.policy, model.centroids.dtype)
        model.centroids.data.copy_(released)
        return release

    @torch.no_grad()
    def refit_centroids(self, model: FussModel, seed: int) -> None:
        """Cosine k-means of (a random sample of) this site's head codes, started from the current centroids."""
        tc = self.cfg.train
        gen = torch.Generator().manual_seed(seed)
        model.eval()
        views = torch.randperm(self.feats.num_views, generator=gen)
        h, w = self.h, self.w
        per_view = max(1, min(h * w, math.ceil(tc.centroid_refit_points / len(views))))
        codes = []
        for feats in self.feats.chunks(views, 64, self.device):
            code = model(feats).flatten(2).transpose(1, 2)  # (B, h*w, D)
            pick = torch.rand(code.shape[:2], generator=gen).argsort(dim=1)[:, :per_view].to(code.device)
            codes.append(code.gather(1, pick[..., None].expand(-1, -1, code.shape[2])).flatten(0, 1))
        model.centroids.data.copy_(spherical_kmeans(torch.cat(codes), model.centroids, tc.centroid_refit_iters))
        model.train()

    def mask_proposals_of(self, views: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """PriMaPs mask ids ``(B, h, w)`` of ``views`` (their features ``(B, D', h, w)``), computed once per view."""
        pc = self.cfg.train.primaps
        for row, view in enumerate(views.tolist()):
            if view not in self.mask_proposals:
                self.mask_proposals[view] = principal_mask_proposals(
                    feats[row].float(), pc.threshold, pc.coverage, pc.max_masks).cpu()
        return torch.stack([self.mask_proposals[v] for v in views.tolist()]).to(self.device)

    @torch.no_grad()
    def clusters_used(self, model: FussModel, max_views: int = 256) -> int:
        """How many centroids are the argmax somewhere on an evenly spaced sample of this site's training views."""
        model.eval()
        n = self.feats.num_views
        index = torch.arange(0, n, max(1, n // max_views))
        used = torch.zeros(self.num_clusters, dtype=torch.bool, device=self.device)
        for feats in self.feats.chunks(index, 32, self.device):
            used[model.cluster_logits(feats).argmax(dim=1).flatten()] = True
        model.train()
        return int(used.sum())


# --------------------------------------------------------------------------------------- one step class per objective
# A step object lives for one round: ``begin_round`` sets up the prototype optimiser(s), ``head_loss`` returns the
# head's loss (and the terms to report) for a batch of views, ``update_prototypes`` then moves the prototypes on the
# batch's (pre-step) codes. What travels is always ``model.centroids``; any other prototype set is round-local.


class _CentroidLossStep:
    """Shared by stego and ppap: the centroids are trained by their own Adam on the detached codes (paper Eq. 5,
    hard assignment, plus ``centroid_lambda`` times the inter-centroid similarity), with dead-centroid reseeding."""

    lr_head: float
    lr_centroids: float
    refits_centroids = True  # train.centroids = "kmeans" applies

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self.tc = trainer.cfg.train
        self.reseeded = 0

    def begin_round(self, model: FussModel, round_idx: int) -> None:
        self.optimizer = torch.optim.Adam([model.centroids], lr=self.lr_centroids)
        self.usage = torch.zeros(self.trainer.num_clusters, dtype=torch.long, device=self.trainer.device)

    def partners(self, q: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return []  # PPAP contrasts the batch's own patches

    def update_prototypes(self, model: FussModel, code_q: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        closs, assignment, best = centroid_loss(code_q, model.centroids, self.tc.centroid_lambda)
        self.optimizer.zero_grad(set_to_none=True)
        closs.backward()
        self.optimizer.step()
        flat = assignment.flatten()  # counted with index_add_: bincount's output size would need a host sync
        self.usage.index_add_(0, flat, torch.ones_like(flat))
        if self.tc.reseed_dead_every and (step + 1) % self.tc.reseed_dead_every == 0:
            self.reseeded += _reseed_dead(model, self.optimizer, self.usage, code_q.detach(), best)
            self.usage.zero_()
        return {"loss_centroids": closs}


class _StegoStep(_CentroidLossStep):
    """FUSS / STEGO: correspondence distillation (paper Eq. 6) with self, kNN and random-image terms.

    The partners' codes are computed only on the tokens the sampled points read (``losses.bilinear_corners``):
    the same numbers as the head on the whole maps followed by bilinear sampling, for the head acts per token."""

    def __init__(self, trainer: LocalTrainer):
        super().__init__(trainer)
        self.lr_head, self.lr_centroids = self.tc.lr_head, self.tc.lr_centroids

    def partners(self, q: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """One of its ``train.knn`` nearest views per query, and ``train.num_random`` random other views."""
        knn, bq = self.trainer._knn, len(q)
        pos = knn[q, torch.randint(knn.shape[1], (bq,), generator=gen)]
        return [pos, _random_others(q, self.trainer.feats.num_views, self.tc.num_random, gen).flatten()]

    def head_loss(self, model, q, feats_q, code_q, gen, batch: "StepBatch | None" = None):
        trainer, lc, shifts = self.trainer, self.trainer.cfg.loss, self.trainer.shifts
        if batch is None:  # a caller outside the training loop (the selection probe): draw the partners
            partners = ViewRows(trainer.feats.store, torch.cat(self.partners(q, gen)))
            batch = StepBatch(q, feats_q.permute(0, 2, 3, 1), code_q.permute(0, 2, 3, 1), None, partners)
        g, r, bq, device = lc.grid, self.tc.num_random, len(q), batch.tokens_q.device
        h, w, hw = trainer.h, trainer.w, trainer.h * trainer.w
        coords_q, coords_p = random_grid(bq, g, gen), random_grid(bq, g, gen)
        coords_n = random_grid(bq * r, g, gen)
        # queries: their whole code maps exist already (the centroid loss reads every position)
        index, weight = bilinear_corners(coords_q.to(device), h, w)
        index = index + (torch.arange(bq, device=device) * hw)[:, None, None]
        fq = gather_points(batch.tokens_q.reshape(-1, trainer.in_dim), index, weight)
        cq = gather_points(batch.code_tokens.reshape(-1, batch.code_tokens.shape[-1]), index, weight)
        # partners: the head on the distinct tokens the points read, with each map's dropout
        partners = batch.partners
        # the token positions are computed where the partners' tokens are (the host for a pool in RAM), so that
        # reading them needs no copy back from the GPU
        where = partners.index_device(device)
        index, weight = bilinear_corners(torch.cat([coords_p, coords_n]).to(where), h, w)
        index = index + (torch.arange(len(partners), device=where) * hw)[:, None, None]
        read, inverse = torch.unique(index, return_inverse=True)
        # padded to a multiple of ROW_BLOCK rows (repeats of a read token, which no point uses): the matrix
        # products then see a few shapes only, and the CPU's kernels (oneDNN) are built once, not every step
        read = torch.cat([read, read[:1].expand((-len(read)) % ROW_BLOCK)])
        tokens = partners.take(read, device)
        read, inverse, weight = (x.to(device, non_blocking=True) for x in (read, inverse, weight))
        dtype = trainer.precision  # of the head's products, and of the feature correlations (no gradient)
        scale = model.head.dropout_scale(len(partners), device, dtype)
        codes = trainer.project(model, tokens, None if scale is None else scale[read // hw])
        fpn, cpn = gather_points(tokens.to(dtype), inverse, weight), gather_points(codes, inverse, weight)
        fq, cq, fpn, cpn = (F.normalize(x, dim=-1, eps=1e-10) for x in (fq, cq, fpn, cpn))  # cosines: unit rows
        fp, fn = fpn[:bq], fpn[bq:].reshape(bq, r * g * g, -1)
        cp, cn = cpn[:bq], cpn[bq:].reshape(bq, r * g * g, -1)
        with torch.no_grad():  # the feature correlations do not depend on the head
            fql = fq.to(dtype)
            fd_self = center_points((fql @ fql.transpose(1, 2)).float(), lc.pointwise)
            fd_knn = center_points((fql @ fp.transpose(1, 2)).float(), lc.pointwise)
            fd_random = center_points((fql @ fn.transpose(1, 2)).float().unflatten(2, (r, g * g)), lc.pointwise)
        terms = {
            "loss_self": point_correspondence_term(fd_self, cq @ cq.transpose(1, 2), shifts.self),
            "loss_knn": point_correspondence_term(fd_knn, cq @ cp.transpose(1, 2), shifts.knn),
            "loss_random": point_correspondence_term(
                fd_random, (cq @ cn.transpose(1, 2)).unflatten(2, (r, g * g)), shifts.random),
        }
        loss = (lc.self_weight * terms["loss_self"] + lc.knn_weight * terms["loss_knn"]
                + lc.random_weight * terms["loss_random"])
        return loss, terms


class _PpapStep(_CentroidLossStep):
    """PPAP: patch-wise contrastive loss on the head codes, positives / negatives chosen on the cached features by
    propagated proxy anchors with an ambiguity zone; centroids as in stego."""

    def __init__(self, trainer: LocalTrainer):
        super().__init__(trainer)
        self.pc = self.tc.ppap
        self.lr_head, self.lr_centroids = self.pc.lr_head, self.pc.lr_prototypes

    def head_loss(self, model, q, feats_q, code_q, gen, batch=None):
        pc = self.pc
        feats = feats_q.permute(0, 2, 3, 1).reshape(-1, feats_q.shape[1])  # every patch of the batch
        codes = code_q.permute(0, 2, 3, 1).reshape(-1, code_q.shape[1])
        num_anchors = max(1, round(pc.anchor_fraction * len(feats)))
        anchors = torch.randperm(len(feats), generator=gen)[:num_anchors].to(feats.device)
        positive, negative = proxy_anchor_partition(feats[anchors], feats, anchors, pc.positive_threshold,
                                                    pc.ambiguity_threshold, pc.propagation_steps,
                                                    pc.sigma_positive, pc.sigma_ambiguity)
        loss = proxy_anchor_contrastive_loss(codes[anchors], codes, positive, negative, pc.temperature)
        return loss, {"loss_ppap": loss, "ppap_positives": positive.sum(dim=1).float().mean(),
                      "ppap_negatives": negative.sum(dim=1).float().mean()}


class _SmoosegStep:
    """SmooSeg: smoothness terms within an image and with another image of the batch, on the teacher's soft
    assignments; student prototypes by cross-entropy to the teacher's argmax; teacher = EMA of the student.

    ``model.centroids`` is the teacher (what travels). The student is round-local: re-initialised from the
    received teacher at the start of every round (fresh optimiser, like the head's)."""

    reseeded = 0
    refits_centroids = False  # the teacher prototypes move by EMA only

    def partners(self, q: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return []  # the batch's own views only

    def __init__(self, trainer: LocalTrainer):
        self.sc = trainer.cfg.train.smooseg
        self.pointwise = trainer.cfg.loss.pointwise
        self.lr_head = self.sc.lr_head

    def begin_round(self, model: FussModel, round_idx: int) -> None:
        model.centroids.requires_grad_(False)  # the teacher moves only by EMA
        self.student = torch.nn.Parameter(model.centroids.detach().clone())
        self.optimizer = torch.optim.Adam([self.student], lr=self.sc.lr_prototypes)

    def head_loss(self, model, q, feats_q, code_q, gen, batch=None):
        sc = self.sc
        probs = soft_assignment(code_q, model.centroids.detach(), sc.temperature)
        within = smoothness_term(feats_q, feats_q, probs, probs, sc.within_shift, self.pointwise)
        if len(q) > 1:  # pair each view with another view of the batch (a random cyclic shift: never itself)
            other = (torch.arange(len(q)) + torch.randint(1, len(q), (1,), generator=gen)) % len(q)
            other = other.to(feats_q.device)
            cross = smoothness_term(feats_q, feats_q[other], probs, probs[other], sc.cross_shift, self.pointwise)
        else:
            cross = within * 0.0
        return within + cross, {"loss_smooth_within": within, "loss_smooth_cross": cross}

    def update_prototypes(self, model: FussModel, code_q: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        loss = student_prototype_loss(code_q, self.student, model.centroids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update_(model.centroids.data, self.student, self.sc.teacher_ema)
        return {"loss_prototypes": loss}


class _PrimapsStep:
    """PriMaPs-EM: pseudo labels from the principal mask proposals of the cached features (E-step: each mask takes
    the majority class of the momentum prototypes), fast prototypes and head fitted to them by the
    confidence-weighted focal loss (M-step), momentum prototypes = EMA of the fast ones.

    ``model.centroids`` holds the momentum prototypes (what travels); the fast prototypes are round-local,
    re-initialised from them every round. In round 0 both start from a cosine k-means of the first batch's codes
    seeded with the received centroids."""

    reseeded = 0
    refits_centroids = False  # the momentum prototypes move by EMA only

    def partners(self, q: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return []  # the batch's own views only

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self.pc = trainer.cfg.train.primaps
        self.lr_head = self.pc.lr_head

    def begin_round(self, model: FussModel, round_idx: int) -> None:
        model.centroids.requires_grad_(False)  # the momentum prototypes move only by EMA
        self.fast = torch.nn.Parameter(model.centroids.detach().clone())
        self.optimizer = torch.optim.Adam([self.fast], lr=self.pc.lr_prototypes)
        self.initialise = round_idx == 0 and self.pc.kmeans_iters > 0

    def head_loss(self, model, q, feats_q, code_q, gen, batch=None):
        pc = self.pc
        if self.initialise:
            points = code_q.detach().permute(0, 2, 3, 1).reshape(-1, code_q.shape[1])
            centres = spherical_kmeans(points, model.centroids, pc.kmeans_iters)
            model.centroids.data.copy_(centres)
            self.fast.data.copy_(centres)
            self.initialise = False
        with torch.no_grad():
            predictions = cosine_to_prototypes(code_q, model.centroids).argmax(dim=1)
        self.labels = masks_to_pseudo_labels(self.trainer.mask_proposals_of(q, feats_q), predictions,
                                             self.trainer.num_clusters, pc.max_masks)
        logits = cosine_to_prototypes(code_q, self.fast.detach()) / pc.temperature
        loss = confidence_focal_loss(logits, self.labels, pc.focal_gamma)
        return loss, {"loss_focal": loss, "pseudo_labelled": (self.labels >= 0).float().mean()}

    def update_prototypes(self, model: FussModel, code_q: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        logits = cosine_to_prototypes(code_q.detach(), self.fast) / self.pc.temperature
        loss = confidence_focal_loss(logits, self.labels, self.pc.focal_gamma)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if (step + 1) % self.pc.ema_every == 0:
            ema_update_(model.centroids.data, self.fast, self.pc.ema_decay)
        return {}


OBJECTIVE_STEPS = {"stego": _StegoStep, "smooseg": _SmoosegStep, "primaps": _PrimapsStep, "ppap": _PpapStep}


def _random_others(index: torch.Tensor, n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random view indices per query, never the query itself."""
    offsets = torch.randint(1, n, (len(index), count), generator=gen)
    return (index[:, None] + offsets) % n


@torch.no_grad()
def _reseed_dead(model: FussModel, optimizer: torch.optim.Optimizer, usage: torch.Tensor, code: torch.Tensor,
                 best: torch.Tensor) -> int:
    """Move every centroid that nobody chose since the last check onto the worst-explained code vectors."""
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead) == 0:
        return 0
    vectors = code.permute(0, 2, 3, 1).reshape(-1, code.shape[1])
    worst = best.flatten().argsort()[: len(dead)]
    model.centroids.data[dead.to(model.centroids.device)] = torch.nn.functional.normalize(vectors[worst], dim=1)
    state = optimizer.state.get(model.centroids, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return len(dead)


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of views fit in half of ``device``'s free memory (the rest is for the steps)."""
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:
        return False
    return nbytes <= free // 2
