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

import torch

from .cache import VIEWS_PER_IMAGE, TrainFeatures
from .config import FussConfig
from .disclosure import DisclosurePolicy, Release, local_steps, release_centroids
from .head import CENTROIDS_KEY, FussModel
from .losses import (centered_feature_correlation, centroid_loss, correspondence_term, fedprox_term, moon_term,
                     quantile_shift, random_grid, sample_at)
from .objectives import (confidence_focal_loss, cosine_to_prototypes, ema_update_, masks_to_pseudo_labels,
                         principal_mask_proposals, proxy_anchor_contrastive_loss, proxy_anchor_partition,
                         smoothness_term, soft_assignment, spherical_kmeans, student_prototype_loss)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        self.feats = feats
        self.cfg = cfg
        self.site = site
        self.num_clusters = num_clusters
        self.policy = policy or DisclosurePolicy()  # the site's: how its centroids leave (release_centroids)
        self.device = resolve_device(cfg.train.device)
        self.in_dim = feats.feats.shape[1]
        # on a GPU the whole cache goes to device memory once; on the CPU it stays float16 and batches convert
        self._pool = feats.feats.to(self.device)
        self._knn = feats.knn
        self.shifts: Shifts | None = None
        self.previous_state: dict[str, torch.Tensor] | None = None
        self.mask_proposals: dict[int, torch.Tensor] = {}  # view index -> PriMaPs mask ids (h, w), on the CPU

    def steps_per_round(self) -> int:
        return local_steps(self.cfg, self.feats.num_images)

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
        return self._pool[index.to(self._pool.device)].float()

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

        n, b = self.feats.num_views, tc.batch_size
        order = torch.randperm(n, generator=gen)
        cursor = 0
        totals: dict[str, float] = {}
        started = time.perf_counter()
        for step in range(steps):
            if cursor + b > n:  # next local epoch
                order, cursor = torch.randperm(n, generator=gen), 0
            q = order[cursor:cursor + b]
            cursor += b
            feats_q = self._batch(q)
            code_q = model(feats_q)
            loss, terms = objective.head_loss(model, q, feats_q, code_q, gen)
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
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())

        if objective.refits_centroids and tc.centroids == "kmeans":
            self.refit_centroids(model, stable_seed(seed, "refit"))
        release = self.release_centroids(model, global_state[CENTROIDS_KEY], stable_seed(seed, "release"))
        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        self.previous_state = state
        metrics = {k: v / steps for k, v in totals.items()}
        metrics.update(steps=float(steps), clusters_reseeded=float(objective.reseeded),
                       clusters_used=float(_clusters_used(model, self._pool, self.device)),
                       centroids_replaced=float(len(release.replaced)), seconds=time.perf_counter() - started)
        return LocalResult(state, self.feats.num_images, metrics, release)

    @torch.no_grad()
    def release_centroids(self, model: FussModel, received: torch.Tensor, seed: int) -> Release:
        """Replace ``model.centroids`` by what may leave the site (``disclosure.release_centroids``), counted on
        every position of a seeded sample of the site's views (at most ``policy.support_codes`` codes)."""
        gen = torch.Generator().manual_seed(seed)
        h, w = self.feats.feats.shape[-2:]
        count = min(self.feats.num_views, max(1, math.ceil(self.policy.support_codes / (h * w))))
        views = torch.randperm(self.feats.num_views, generator=gen)[:count]
        # float64, so that which centroid a code chooses does not depend on the summation order of the machine's
        # thread count (the FLARE sites and the in-process runner give the same result)
        head = copy.deepcopy(model.head).double().eval()
        codes = torch.cat([head(self._batch(chunk).double()).flatten(2).transpose(1, 2).flatten(0, 1)
                           for chunk in views.split(64)])
        image_ids = (views // VIEWS_PER_IMAGE).repeat_interleave(h * w).to(codes.device)
        released, release = release_centroids(codes, image_ids, model.centroids, received, self.policy)
        model.centroids.data.copy_(released)
        return release

    @torch.no_grad()
    def refit_centroids(self, model: FussModel, seed: int) -> None:
        """Cosine k-means of (a random sample of) this site's head codes, started from the current centroids."""
        tc = self.cfg.train
        gen = torch.Generator().manual_seed(seed)
        model.eval()
        views = torch.randperm(self.feats.num_views, generator=gen)
        h, w = self.feats.feats.shape[-2:]
        per_view = max(1, min(h * w, math.ceil(tc.centroid_refit_points / len(views))))
        codes = []
        for chunk in views.split(64):
            code = model(self._batch(chunk)).flatten(2).transpose(1, 2)  # (B, h*w, D)
            pick = torch.rand(code.shape[:2], generator=gen).argsort(dim=1)[:, :per_view].to(code.device)
            codes.append(code.gather(1, pick[..., None].expand(-1, -1, code.shape[2])).flatten(0, 1))
        model.centroids.data.copy_(spherical_kmeans(torch.cat(codes), model.centroids, tc.centroid_refit_iters))
        model.train()

    def mask_proposals_of(self, views: torch.Tensor) -> torch.Tensor:
        """PriMaPs mask ids ``(B, h, w)`` of ``views``, computed once per view from the cached features."""
        pc = self.cfg.train.primaps
        for view in views.tolist():
            if view not in self.mask_proposals:
                self.mask_proposals[view] = principal_mask_proposals(
                    self._pool[view].float(), pc.threshold, pc.coverage, pc.max_masks).cpu()
        return torch.stack([self.mask_proposals[v] for v in views.tolist()]).to(self.device)


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
        self.usage = torch.zeros(self.trainer.num_clusters, dtype=torch.long)

    def update_prototypes(self, model: FussModel, code_q: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        closs, assignment, best = centroid_loss(code_q, model.centroids, self.tc.centroid_lambda)
        self.optimizer.zero_grad(set_to_none=True)
        closs.backward()
        self.optimizer.step()
        self.usage += torch.bincount(assignment.flatten().cpu(), minlength=self.trainer.num_clusters)
        if self.tc.reseed_dead_every and (step + 1) % self.tc.reseed_dead_every == 0:
            self.reseeded += _reseed_dead(model, self.optimizer, self.usage, code_q.detach(), best)
            self.usage.zero_()
        return {"loss_centroids": closs}


class _StegoStep(_CentroidLossStep):
    """FUSS / STEGO: correspondence distillation (paper Eq. 6) with self, kNN and random-image terms."""

    def __init__(self, trainer: LocalTrainer):
        super().__init__(trainer)
        self.lr_head, self.lr_centroids = self.tc.lr_head, self.tc.lr_centroids

    def head_loss(self, model, q, feats_q, code_q, gen):
        trainer, lc, shifts = self.trainer, self.trainer.cfg.loss, self.trainer.shifts
        n, g, r, bq = trainer.feats.num_views, lc.grid, self.tc.num_random, len(q)
        pos = trainer._knn[q, torch.randint(trainer._knn.shape[1], (bq,), generator=gen)]
        neg = _random_others(q, n, r, gen).flatten()
        coords_q, coords_p = random_grid(bq, g, gen), random_grid(bq, g, gen)
        coords_n = random_grid(bq * r, g, gen)
        feats_p, feats_n = trainer._batch(pos), trainer._batch(neg)
        fq, cq = sample_at(feats_q, coords_q), sample_at(code_q, coords_q)
        fp, cp = sample_at(feats_p, coords_p), sample_at(model(feats_p), coords_p)
        fn, cn = sample_at(feats_n, coords_n), sample_at(model(feats_n), coords_n)
        fq_rep, cq_rep = fq.repeat_interleave(r, 0), cq.repeat_interleave(r, 0)
        terms = {
            "loss_self": correspondence_term(fq, fq, cq, cq, shifts.self, lc.pointwise),
            "loss_knn": correspondence_term(fq, fp, cq, cp, shifts.knn, lc.pointwise),
            "loss_random": correspondence_term(fq_rep, fn, cq_rep, cn, shifts.random, lc.pointwise),
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

    def head_loss(self, model, q, feats_q, code_q, gen):
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

    def __init__(self, trainer: LocalTrainer):
        self.sc = trainer.cfg.train.smooseg
        self.pointwise = trainer.cfg.loss.pointwise
        self.lr_head = self.sc.lr_head

    def begin_round(self, model: FussModel, round_idx: int) -> None:
        model.centroids.requires_grad_(False)  # the teacher moves only by EMA
        self.student = torch.nn.Parameter(model.centroids.detach().clone())
        self.optimizer = torch.optim.Adam([self.student], lr=self.sc.lr_prototypes)

    def head_loss(self, model, q, feats_q, code_q, gen):
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

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self.pc = trainer.cfg.train.primaps
        self.lr_head = self.pc.lr_head

    def begin_round(self, model: FussModel, round_idx: int) -> None:
        model.centroids.requires_grad_(False)  # the momentum prototypes move only by EMA
        self.fast = torch.nn.Parameter(model.centroids.detach().clone())
        self.optimizer = torch.optim.Adam([self.fast], lr=self.pc.lr_prototypes)
        self.initialise = round_idx == 0 and self.pc.kmeans_iters > 0

    def head_loss(self, model, q, feats_q, code_q, gen):
        pc = self.pc
        if self.initialise:
            points = code_q.detach().permute(0, 2, 3, 1).reshape(-1, code_q.shape[1])
            centres = spherical_kmeans(points, model.centroids, pc.kmeans_iters)
            model.centroids.data.copy_(centres)
            self.fast.data.copy_(centres)
            self.initialise = False
        with torch.no_grad():
            predictions = cosine_to_prototypes(code_q, model.centroids).argmax(dim=1)
        self.labels = masks_to_pseudo_labels(self.trainer.mask_proposals_of(q), predictions,
                                             self.trainer.num_clusters)
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


@torch.no_grad()
def _clusters_used(model: FussModel, pool: torch.Tensor, device: torch.device, max_views: int = 256) -> int:
    """How many centroids are the argmax somewhere on (a sample of) this site's training views."""
    model.eval()
    step = max(1, len(pool) // max_views)
    used = set()
    for start in range(0, len(pool), step * 32):
        batch = pool[start:start + step * 32:step].float().to(device)
        used.update(model.cluster_logits(batch).argmax(dim=1).unique().tolist())
    model.train()
    return len(used)
