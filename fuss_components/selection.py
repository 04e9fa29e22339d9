"""Label-free model selection criteria: what a site can say about a global model without labels.

A federation of unlabeled sites cannot pick its best round by validation mIoU. Instead every training site
measures the GLOBAL model it receives at the start of a ``train`` task, before local training, on a fixed seeded
subset of its cached training views, and sends the values with its training metrics as ``selection_<criterion>``:

``inertia``         mean over positions of the largest cosine between the head's unit code and a unit centroid
                    (higher: the codes sit closer to their centroids; minus the intra term of paper Eq. 5);
``balance``         normalised entropy of the cluster-usage histogram of the argmax assignments (1: every cluster
                    takes the same share of the positions, 0: one cluster takes them all);
``agreement``       fraction of the positions whose argmax cluster is the same as under the global model of the
                    round before, clusters matched one to one (the site keeps that model's assignments in memory:
                    absent in its first round, after a restart and after a round it did not train in);
``correspondence``  STEGO's correspondence loss (paper Eq. 6) of the global head: the stego objective's
                    ``head_loss`` of the trainer, with the site's calibrated shifts, on a fixed set of query views
                    (lower: the codes reproduce the backbone's feature correlations better).

The subset, the queries and every random draw depend on (``train.seed``, site) only, never on the round, so a site
measures every round's model on the same positions and the values are deterministic. Cost: one pass of the head
over at most :data:`MAX_VIEWS` views, plus stego's loss on :data:`CORRESPONDENCE_QUERIES` queries (each with one
kNN view and ``train.num_random`` random views); about a second on one CPU core for 16 x 16 tokens of dimension 384.

Which model a value belongs to: the values a site sends in round ``r`` are those of the global model aggregated in
round ``r - 1`` (the initial model in round 0), the model the validation sites score in the same round.
``fuss_flare.recorder`` files them under that model's round; the last round's model is measured by nobody (no
``train`` task follows it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from .head import FussModel
from .trainer import OBJECTIVE_STEPS, LocalTrainer
from .wire import SiteBounds, check_metrics

CRITERIA = ("inertia", "balance", "agreement", "correspondence")
HIGHER_IS_BETTER = {"inertia": True, "balance": True, "agreement": True, "correspondence": False}
METRIC_PREFIX = "selection_"
METRICS = tuple(METRIC_PREFIX + name for name in CRITERIA)  # the names a site sends
MAX_VIEWS = 256  # views of the subset the assignments are measured on
CORRESPONDENCE_QUERIES = 32  # query views of the correspondence loss (each costs 2 + train.num_random head passes)
CHUNK_VIEWS = 64  # views per head pass


def subset_views(num_views: int, max_views: int, seed: int) -> torch.Tensor:
    """A seeded random subset of at most ``max_views`` of ``num_views`` view indices, in a random order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_views, generator=gen)[:max_views]


def model_of(state: Mapping[str, torch.Tensor], in_dim: int, dim: int, num_clusters: int,
             device: torch.device | str = "cpu") -> FussModel:
    """The FussModel of ``state`` in eval mode, built on the meta device so that building it draws no random
    number (the site's global RNG stays as it was); a state of another shape raises naming the parameter."""
    with torch.device("meta"):
        model = FussModel(in_dim, dim, num_clusters)
    model.load_state_dict({k: v.detach().float().to(device) for k, v in state.items()}, assign=True)
    return model.eval()


@torch.no_grad()
def code_assignments(model: FussModel, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best, assignment)`` over every position of the feature ``batches`` ``(B, D', h, w)``: the largest cosine
    of the unit code to a unit centroid and the argmax centroid, each ``(N, h, w)`` on the CPU."""
    best, assignment = [], []
    for feats in batches:
        value, index = model.cluster_logits(feats).max(dim=1)
        best.append(value.cpu())
        assignment.append(index.cpu())
    return torch.cat(best), torch.cat(assignment)


def inertia(best: torch.Tensor) -> float:
    """Mean over positions of the largest code-centroid cosine (clamped to [-1, 1]: a float32 cosine of equal
    vectors can round above 1, and the wire schema holds the value to its range)."""
    return float(best.double().mean().clamp(-1.0, 1.0))


def balance(assignment: torch.Tensor, num_clusters: int) -> float:
    """Entropy of the cluster-usage histogram of ``assignment`` over log(num_clusters): 1 for uniform usage."""
    if num_clusters < 2:
        return 1.0
    counts = torch.bincount(assignment.flatten(), minlength=num_clusters).double()
    share = counts[counts > 0] / counts.sum()
    return min(1.0, float(-(share * share.log()).sum() / math.log(num_clusters)))  # rounding can pass 1


def agreement(assignment: torch.Tensor, previous: torch.Tensor) -> float:
    """Fraction of positions assigned to the same cluster in ``assignment`` and ``previous`` once the clusters are
    matched one to one (Hungarian on the co-assignment counts): FedCC re-orders the centroids every round, so
    the same partition under other cluster ids must count as full agreement."""
    if assignment.shape != previous.shape:
        raise ValueError(f"assignments of shapes {tuple(assignment.shape)} and {tuple(previous.shape)} are not of "
                         f"the same positions")
    size = int(max(assignment.max(), previous.max())) + 1
    counts = torch.zeros(size * size, dtype=torch.float64)
    counts.index_add_(0, (assignment.flatten() * size + previous.flatten()).long(),
                      torch.ones(assignment.numel(), dtype=torch.float64))
    counts = counts.view(size, size).numpy()
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / assignment.numel())


class SelectionProbe:
    """A site's label-free criteria of the global models it receives (module docstring), on ``trainer``'s cached
    training views; ``seed`` fixes the subset and the draws (the site passes one from ``train.seed`` and its name)."""

    def __init__(self, trainer: LocalTrainer, seed: int, max_views: int = MAX_VIEWS,
                 queries: int = CORRESPONDENCE_QUERIES):
        self.trainer = trainer
        self.seed = seed
        self.views = subset_views(trainer.feats.num_views, max_views, seed)
        self.queries = self.views[:queries]  # the subset is in random order: its first views are a random sample
        self._previous: tuple[int, torch.Tensor] | None = None  # (round, assignments) of the last model measured

    def _features(self, views: torch.Tensor) -> torch.Tensor:
        return self.trainer.feats.views(views, self.trainer.device)

    @torch.no_grad()
    def measure(self, state: Mapping[str, torch.Tensor], round_idx: int) -> dict[str, float]:
        """The criteria of the global model ``state`` received in round ``round_idx``: ``{criterion: value}``,
        without ``agreement`` when this probe did not measure the model of round ``round_idx - 1``."""
        trainer = self.trainer
        model = model_of(state, trainer.in_dim, trainer.cfg.train.dim, trainer.num_clusters, trainer.device)
        best, assignment = code_assignments(model, (self._features(v) for v in self.views.split(CHUNK_VIEWS)))
        values = {"inertia": inertia(best), "balance": balance(assignment, trainer.num_clusters)}
        if self._previous is not None and self._previous[0] == round_idx - 1:
            values["agreement"] = agreement(assignment, self._previous[1])
        self._previous = (round_idx, assignment)
        values["correspondence"] = self.correspondence(model)
        return values

    @torch.no_grad()
    def correspondence(self, model: FussModel) -> float:
        """The stego objective's head loss of ``model`` on the probe's queries, with the same draws every call."""
        trainer = self.trainer
        if trainer.shifts is None:  # what trainer.train does first under stego; the other objectives never read it
            trainer.shifts = trainer.calibrate()
        gen = torch.Generator().manual_seed(self.seed)
        step = OBJECTIVE_STEPS["stego"](trainer)
        total = 0.0
        # a training batch of queries at a time: all 32 at once held ~230 MB of correlations per site process
        for queries in self.queries.split(trainer.cfg.train.batch_size):
            feats_q = self._features(queries)
            loss, _ = step.head_loss(model, queries, feats_q, model(feats_q), gen)
            total += float(loss) * len(queries)  # the loss is a mean over the batch's positions
        return total / len(self.queries)


def as_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """``{criterion: value}`` -> the metric names a site sends (``selection_<criterion>``)."""
    return {METRIC_PREFIX + name: float(value) for name, value in values.items()}


def weighted_criteria(site_metrics: Mapping[str, Mapping], weights: Mapping[str, float]) -> dict[str, float]:
    """Per criterion, the mean over the sites that sent it, weighted by ``weights[site]`` (the training images the
    site declared); a site without a positive weight, and a value that fails the wire schema's check (not a finite
    number, or out of its range), count for nothing: a site's numbers are untrusted on the server."""
    totals: dict[str, float] = {}
    mass: dict[str, float] = {}
    for site, metrics in site_metrics.items():
        weight = weights.get(site, 0)
        if not isinstance(metrics, Mapping) or not weight or weight <= 0:
            continue
        kept, _ = check_metrics({k: v for k, v in metrics.items() if k in METRICS}, METRICS, SiteBounds())
        for name, value in kept.items():
            criterion = name[len(METRIC_PREFIX):]
            totals[criterion] = totals.get(criterion, 0.0) + weight * value
            mass[criterion] = mass.get(criterion, 0.0) + weight
    return {name: totals[name] / mass[name] for name in CRITERIA if name in totals}


def better(criterion: str, value: float, than: float | None) -> bool:
    """Whether ``value`` of ``criterion`` is better than ``than`` (None: nothing yet)."""
    if than is None:
        return True
    return value > than if HIGHER_IS_BETTER[criterion] else value < than
