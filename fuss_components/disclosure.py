"""What a site lets a job learn about its images: site-owned bounds on the settings that govern disclosure, and
centroids released only as aggregates of the site's own patch codes.

A job chooses every hyperparameter, and the centroids a site sends live in the head's code space: with many
clusters, no averaging and dead-centroid reseeding, a centroid can be a copy of one patch code, and with a head as
wide as the features a code can be mapped back to a backbone feature. Two rules close that channel:

* **Bounds the site sets** (:class:`DisclosurePolicy`; never the job's): the most clusters, the widest head (and
  always narrower than half the backbone's channels, so no head is invertible), the fewest training images and
  local steps behind an update, and the fewest validation images behind validation metrics. A job beyond them is
  refused by :func:`check_job` before any extraction or training (``Site.train`` / ``Site.validate`` raise
  :class:`DisclosureError` naming the setting; the FLARE executor writes the reason to the job's audit log).
* **Every centroid that leaves is a mean** (:func:`release_centroids`): after local training the site assigns a
  seeded sample of its own patch codes (at most ``support_codes``, every position of the sampled views) to the
  trained centroids; a centroid that at least ``min_support_codes`` codes from at least ``min_support_images``
  distinct images chose is sent as the normalised mean of those codes, unless (where the site sets
  ``max_code_cosine``) that mean lies within that cosine of one of the sampled codes; any other is replaced by the centroid the site received (which
  the server already knows). Reseeded or untrained rows therefore never leave as raw codes, nor as near copies.

Where a site's policy comes from (:func:`site_policy`): the JSON file named by ``$FUSS_SITE_POLICY``, else
``<site kit>/local/fuss_policy.json`` (written by ``python -m fuss_flare.site_policy``), else the defaults below,
chosen for a hospital (measured effects: ``docs/deployment.md``, section 3.3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .views import VIEWS_PER_IMAGE

POLICY_ENV = "FUSS_SITE_POLICY"
# where a site's data, partition, cache and weights are: a hospital's kit owns them (site_policy --no-byoc)
SITE_OWNED_KEYS = ("data.root", "data.dataset", "partition", "cache_dir", "backbone.weights", "backbone.sha256")
POLICY_FILE = "fuss_policy.json"  # in a FLARE participant's local/ folder
LISTED = 20  # replaced centroids named one by one in an audit line


class DisclosureError(RuntimeError):
    """A job asks a site for more than its disclosure policy allows; the message names the setting and the bound."""


@dataclass(frozen=True)
class DisclosurePolicy:
    """A site's bounds on what a job may make it disclose (module docstring). Every field is the site's."""

    max_clusters: int = 64  # honest FUSS jobs send 2-27 centroids
    max_dim: int = 128  # widest head output D (paper: 70; SmooSeg: 64); also always D <= D' / 2 of the backbone
    min_images: int = 10  # fewest training images a site holds, and reads in a round, to send an update
    min_local_steps: int = 1  # fewest local steps of a round
    min_validation_images: int = 10  # fewest labelled images behind validation metrics (per-class IoU)
    min_support_codes: int = 50  # k: a sent centroid is the mean of at least this many of the site's patch codes
    min_support_images: int = 5  # m: ... drawn from at least this many distinct images
    support_codes: int = 100_000  # patch codes sampled to count each centroid's support
    # a mean of many near-identical codes (a static scene over consecutive frames) is still close to each of them:
    # a centroid whose nearest sampled code has at least this cosine is not sent. Off (1.0) by default: honest
    # centroids of 10,000+ codes lie 0.98-0.998 from their nearest code on camvid; a site that allows hundreds of
    # clusters should set it (docs/deployment.md 3.3)
    max_code_cosine: float = 1.0
    # configuration keys that are the site's, not the job's (site_config): a hospital kit owns SITE_OWNED_KEYS
    site_owned: tuple[str, ...] = ()

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name == "site_owned":
                if isinstance(value, list):
                    object.__setattr__(self, "site_owned", value := tuple(value))
                if not isinstance(value, tuple) or not all(isinstance(k, str) and k for k in value):
                    raise ValueError(f"disclosure policy: site_owned must be a list of configuration keys, "
                                     f"got {value!r}")
            elif spec.name == "max_code_cosine":
                if type(value) not in (int, float) or not 0.0 < value <= 1.0:
                    raise ValueError(f"disclosure policy: {spec.name} must be a number in (0, 1], got {value!r}")
            elif type(value) is not int or value < 1:
                raise ValueError(f"disclosure policy: {spec.name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "disclosure policy") -> "DisclosurePolicy":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: must be a JSON object of {', '.join(cls.keys())}")
        unknown = sorted(set(data) - set(cls.keys()) - {"_comment"})
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {', '.join(cls.keys())}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "_comment"})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> "DisclosurePolicy":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the site's disclosure policy {path}: {err}") from err
        return cls.from_dict(data, str(path))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, int | float | list[str]]:
        return {**dataclasses.asdict(self), "site_owned": list(self.site_owned)}


def site_policy(local_dir: str | Path | None = None) -> DisclosurePolicy:
    """The site's policy: ``$FUSS_SITE_POLICY``, else ``<local_dir>/fuss_policy.json``, else the defaults."""
    path = os.environ.get(POLICY_ENV)
    if path:
        return DisclosurePolicy.load(path)
    if local_dir is not None and (Path(local_dir) / POLICY_FILE).is_file():
        return DisclosurePolicy.load(Path(local_dir) / POLICY_FILE)
    return DisclosurePolicy()


def site_config(job_cfg, site_overrides: dict, policy: DisclosurePolicy, site: str):
    """The configuration a site runs: the job's ``job_cfg`` with the site's own ``site_overrides`` (dotted keys),
    and the lines its audit log gets. A key of ``policy.site_owned`` never takes the job's value: where the site
    sets it, the job's differing value is ignored (one audit line each); where the site does not, a job that
    sets it away from the default is refused (:class:`DisclosureError` naming the keys), so a job can neither
    point a site at another data folder, partition, cache or weights file, nor fill in one the site forgot."""
    from .config import FussConfig, config_value

    notes, problems = [], []
    defaults = FussConfig()
    for key in policy.site_owned:
        job_value, default = config_value(job_cfg, key), config_value(defaults, key)
        if key in site_overrides:
            if job_value != default and job_value != site_overrides[key]:
                notes.append(f"site {site!r} ignores the job's {key}={job_value!r}: the site owns it and uses "
                             f"{site_overrides[key]!r}")
        elif job_value != default:
            problems.append(f"{key}={job_value!r}")
    if problems:
        raise DisclosureError(f"site {site!r} refuses the job: it sets {', '.join(problems)}, which the site owns "
                              f"(site_owned in ${POLICY_ENV} or <kit>/local/{POLICY_FILE}) and has not set in its "
                              f"own configuration ($FUSS_SITE_CONFIG)")
    return job_cfg.with_overrides(site_overrides) if site_overrides else job_cfg, notes


def images_read(cfg, num_images: int) -> int:
    """The fewest distinct images a round's query views can come from: ``steps x batch`` views (at most all of
    them), five views per image."""
    views = min(cfg.round_steps(num_images) * cfg.train.batch_size, num_images * VIEWS_PER_IMAGE)
    return min(num_images, math.ceil(views / VIEWS_PER_IMAGE))


def model_problems(cfg, policy: DisclosurePolicy, in_dim: int, num_clusters: int) -> list[str]:
    """The job's model against the policy: the number of clusters and the head's width."""
    problems = []
    if num_clusters > policy.max_clusters:
        problems.append(f"train.num_clusters={num_clusters} exceeds the site's max_clusters={policy.max_clusters}")
    widest = min(policy.max_dim, in_dim // 2)
    if cfg.train.dim > widest:
        problems.append(f"train.dim={cfg.train.dim} exceeds the widest head this site trains, {widest} "
                        f"(max_dim={policy.max_dim}, and at most half the backbone's {in_dim} channels so that no "
                        f"head is invertible)")
    return problems


def check_job(cfg, policy: DisclosurePolicy, site: str, in_dim: int, num_clusters: int, train_images: int,
              validation_images: int) -> None:
    """Raise :class:`DisclosureError` naming every setting of the job ``cfg`` beyond ``policy`` on this site (its
    training and validation image counts after bad images are left out); nothing is extracted or trained before."""
    problems = model_problems(cfg, policy, in_dim, num_clusters)
    if train_images:
        if train_images < policy.min_images:
            problems.append(f"the site trains on {train_images} images, fewer than its min_images="
                            f"{policy.min_images}")
        else:
            steps, read = cfg.round_steps(train_images), images_read(cfg, train_images)
            if steps < policy.min_local_steps:
                problems.append(f"a round of {steps} local step(s) (federation.local_steps / local_epochs) is "
                                f"below the site's min_local_steps={policy.min_local_steps}")
            if read < policy.min_images:
                problems.append(f"a round reads views of as few as {read} images (federation.local_steps="
                                f"{cfg.federation.local_steps}, train.batch_size={cfg.train.batch_size}), fewer "
                                f"than the site's min_images={policy.min_images}")
    if validation_images and validation_images < policy.min_validation_images:
        problems.append(f"the site validates on {validation_images} images, fewer than its "
                        f"min_validation_images={policy.min_validation_images}")
    if problems:
        raise DisclosureError(f"site {site!r} refuses the job (its disclosure policy, ${POLICY_ENV} or "
                              f"<kit>/local/{POLICY_FILE}): " + "; ".join(problems))


@dataclass
class Release:
    """What :func:`release_centroids` did: per centroid its support (codes, distinct images), the cosine of its
    mean to the nearest sampled code, and which rows were replaced by the received centroids."""

    support_codes: list[int]
    support_images: list[int]
    replaced: list[int]
    nearest_code: list[float] = dataclasses.field(default_factory=list)

    def describe(self, policy: DisclosurePolicy) -> str:
        sent = len(self.support_codes) - len(self.replaced)
        text = (f"{sent} of {len(self.support_codes)} centroids sent as means of >= {policy.min_support_codes} "
                f"patch codes from >= {policy.min_support_images} images")
        if policy.max_code_cosine < 1.0:
            text += f", each below cosine {policy.max_code_cosine} of every sampled code"
        if self.replaced:
            detail = ", ".join(f"{i} ({self.support_codes[i]} codes / {self.support_images[i]} images"
                               + (f" / nearest code {self.nearest_code[i]:.3f})"
                                  if policy.max_code_cosine < 1.0 else ")") for i in self.replaced[:LISTED])
            more = f" and {len(self.replaced) - LISTED} more" if len(self.replaced) > LISTED else ""
            text += f"; replaced by the received centroids: {detail}{more}"
        return text


class Support:
    """Each centroid's support, accumulated over chunks of the site's patch codes: which codes choose it (argmax
    cosine, in float64 so that the choice does not depend on a machine's summation order), the sum of their unit
    vectors, and the distinct images they come from. With ``keep_codes`` (a policy with ``max_code_cosine``
    below 1) the sampled unit codes are kept, at most the policy's ``support_codes``, to measure how close each
    mean lies to a single code."""

    def __init__(self, centroids: torch.Tensor, keep_codes: bool = True):
        self.keep_codes = keep_codes
        self.centroids = F.normalize(centroids.detach().double(), dim=1)
        k = len(centroids)
        self.counts = torch.zeros(k, dtype=torch.long, device=centroids.device)
        self.sums = torch.zeros(k, centroids.shape[1], dtype=torch.float64, device=centroids.device)
        self.pairs: set[tuple[int, int]] = set()  # (centroid, image)
        self.codes: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, codes: torch.Tensor, image_ids: torch.Tensor) -> None:
        unit = F.normalize(codes.double(), dim=1)
        assignment = (unit @ self.centroids.T).argmax(dim=1)
        self.counts += torch.bincount(assignment, minlength=len(self.counts))
        self.sums.index_add_(0, assignment, unit)
        self.pairs.update(zip(assignment.tolist(), image_ids.tolist()))
        if self.keep_codes:
            self.codes.append(unit)

    @torch.no_grad()
    def nearest_code(self, means: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Per row of ``means`` (unit, float64), the largest cosine to any sampled code."""
        best = torch.full((len(means),), -1.0, dtype=torch.float64, device=means.device)
        for codes in self.codes:
            for part in codes.split(chunk):
                best = torch.maximum(best, (means @ part.T).max(dim=1).values)
        return best

    def release(self, received: torch.Tensor, policy: DisclosurePolicy,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Release]:
        """Each supported centroid as the unit mean of its codes' unit vectors, the others as ``received``."""
        images = torch.zeros_like(self.counts)
        for centroid, _ in self.pairs:
            images[centroid] += 1
        means = F.normalize(self.sums, dim=1)
        ok = (self.counts >= policy.min_support_codes) & (images >= policy.min_support_images)
        if self.keep_codes:
            nearest = self.nearest_code(means)
            if policy.max_code_cosine < 1.0:
                ok &= nearest < policy.max_code_cosine
        else:
            nearest = torch.full((len(means),), math.nan, dtype=torch.float64)
        released = means.to(dtype)
        released[~ok] = received.to(released.device, dtype)[~ok]
        return released, Release(self.counts.tolist(), images.tolist(), torch.nonzero(~ok).flatten().tolist(),
                                 nearest.tolist())


@torch.no_grad()
def release_centroids(codes: torch.Tensor, image_ids: torch.Tensor, centroids: torch.Tensor,
                      received: torch.Tensor, policy: DisclosurePolicy) -> tuple[torch.Tensor, Release]:
    """The centroids a site may send (module docstring): ``codes`` ``(N, D)`` patch codes of the site with the
    index of their image ``image_ids`` ``(N,)``, the trained ``centroids`` and the ``received`` ones ``(C, D)``.
    Each supported centroid becomes the unit mean of its codes' unit vectors; the others the received rows."""
    support = Support(centroids, keep_codes=policy.max_code_cosine < 1.0)
    support.add(codes, image_ids)
    return support.release(received, policy, centroids.dtype)
