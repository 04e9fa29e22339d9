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

from .cache import TrainFeatures
from .config import FussConfig
from .head import FussModel
from .losses import (centered_feature_correlation, centroid_loss, correspondence_term, fedprox_term, moon_term,
                     quantile_shift, random_grid, sample_at)

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


class LocalTrainer:
    """Runs local steps of FUSS on one site's :class:`TrainFeatures`.

    Stateful across rounds only in what the algorithm needs: the calibrated shifts, and the site's previous
    local model (MOON's negative; the kept head/centroids when the E/C switches are off).
    """

    def __init__(self, feats: TrainFeatures, cfg: FussConfig, site: str, num_clusters: int):
        if feats.num_views < 2:
            raise ValueError(f"site {site!r} has {feats.num_views} training views; at least 2 are needed")
        self.feats = feats
        self.cfg = cfg
        self.site = site
        self.num_clusters = num_clusters
        self.device = resolve_device(cfg.train.device)
        self.in_dim = feats.feats.shape[1]
        # on a GPU the whole cache goes to device memory once; on the CPU it stays float16 and batches convert
        self._pool = feats.feats.to(self.device)
        self._knn = feats.knn
        self.shifts: Shifts | None = None
        self.previous_state: dict[str, torch.Tensor] | None = None

    def steps_per_round(self) -> int:
        fed = self.cfg.federation
        if fed.local_steps is not None:
            return fed.local_steps
        return max(1, math.ceil(fed.local_epochs * self.feats.num_views / self.cfg.train.batch_size))

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
        steps and return the new local state. Deterministic for (seed, site, round)."""
        tc, lc, fed = self.cfg.train, self.cfg.loss, self.cfg.federation
        steps = steps or self.steps_per_round()
        if self.shifts is None:
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
        head_params = dict(model.head.named_parameters())
        opt_head = torch.optim.Adam(head_params.values(), lr=tc.lr_head)
        opt_centroids = torch.optim.Adam([model.centroids], lr=tc.lr_centroids)

        global_head = previous_head = None
        global_params = {}
        if tc.fedprox_mu > 0 or tc.moon_weight > 0:
            global_head = copy.deepcopy(model.head).eval().requires_grad_(False)
            global_head.load_state_dict({k[5:]: v for k, v in global_state.items() if k.startswith("head.")})
            global_params = {k: v.detach() for k, v in global_head.named_parameters()}
        if tc.moon_weight > 0 and self.previous_state is not None:
            previous_head = copy.deepcopy(global_head)
            previous_head.load_state_dict({k[5:]: v for k, v in self.previous_state.items() if k.startswith("head.")})

        n, g, b, r = self.feats.num_views, lc.grid, tc.batch_size, tc.num_random
        order = torch.randperm(n, generator=gen)
        cursor = 0
        usage = torch.zeros(self.num_clusters, dtype=torch.long)
        totals: dict[str, float] = {}
        reseeded = 0
        started = time.perf_counter()
        for step in range(steps):
            if cursor + b > n:  # next local epoch
                order, cursor = torch.randperm(n, generator=gen), 0
            q = order[cursor:cursor + b]
            cursor += b
            bq = len(q)
            pos = self._knn[q, torch.randint(self._knn.shape[1], (bq,), generator=gen)]
            neg = _random_others(q, n, r, gen).flatten()
            coords_q, coords_p = random_grid(bq, g, gen), random_grid(bq, g, gen)
            coords_n = random_grid(bq * r, g, gen)

            feats_q = self._batch(q)
            code_q = model(feats_q)
            fq, cq = sample_at(feats_q, coords_q), sample_at(code_q, coords_q)
            fp = sample_at(self._batch(pos), coords_p)
            fn = sample_at(self._batch(neg), coords_n)
            cp, cn = model(fp), model(fn)  # 1x1 convs: sampling then projecting = projecting then sampling
            fq_rep, cq_rep = fq.repeat_interleave(r, 0), cq.repeat_interleave(r, 0)
            terms = {
                "loss_self": correspondence_term(fq, fq, cq, cq, self.shifts.self, lc.pointwise),
                "loss_knn": correspondence_term(fq, fp, cq, cp, self.shifts.knn, lc.pointwise),
                "loss_random": correspondence_term(fq_rep, fn, cq_rep, cn, self.shifts.random, lc.pointwise),
            }
            loss = (lc.self_weight * terms["loss_self"] + lc.knn_weight * terms["loss_knn"]
                    + lc.random_weight * terms["loss_random"])
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

            closs, assignment, best = centroid_loss(code_q, model.centroids, tc.centroid_lambda)
            opt_centroids.zero_grad(set_to_none=True)
            closs.backward()
            opt_centroids.step()
            terms["loss_centroids"] = closs
            usage += torch.bincount(assignment.flatten().cpu(), minlength=self.num_clusters)
            if tc.reseed_dead_every and (step + 1) % tc.reseed_dead_every == 0:
                reseeded += _reseed_dead(model, opt_centroids, usage, code_q.detach(), best)
                usage.zero_()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())

        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        self.previous_state = state
        metrics = {k: v / steps for k, v in totals.items()}
        metrics.update(steps=float(steps), clusters_reseeded=float(reseeded),
                       clusters_used=float(_clusters_used(model, self._pool, self.device)),
                       seconds=time.perf_counter() - started)
        return LocalResult(state, self.feats.num_images, metrics)


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
