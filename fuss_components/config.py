"""One small typed configuration for every FUSS run (CLI, in-process runner and FLARE jobs).

Defaults are the values of ``shared/docs/fuss-spec.md``; the few that differ because of the shared backbone
(feature block, shifts) say so. ``FussConfig.from_dict`` rejects unknown keys, wrong types and impossible values
before any work starts, naming the offending key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


AUTOCAST_DTYPES = ("none", "bfloat16", "float16")


@dataclass
class BackboneConfig:
    """Frozen self-supervised ViT that turns images into dense patch features."""

    name: str = "vit_small_patch14_dinov2"  # timm model name: a ViT of the DINO / DINOv2 families
    # Local .safetensors/.pth file, or "timm" to use timm's pretrained tag of `name`.
    # None: $FUSS_BACKBONE_WEIGHTS, else the shared DINOv2 ViT-S/14 file (see docs/assets caveat).
    weights: str | None = None
    sha256: str | None = None  # expected sha256 of the weights file (64 hex digits); None = not checked
    # Index of the transformer block whose patch tokens (after the final norm) are the features; -1 = last.
    # 7 (the 8th block) by default: the shared weights' last blocks are saliency-biased (shared/docs/assets.md), and
    # on the camvid development split block 7 beat block 8 (raw k-means and trained head; docs/results.md, 8).
    block: int = 7
    # Mixed precision of the backbone pass at extraction and prediction: "none" (float32), "bfloat16" or "float16"
    # (autocast; on a GPU about 2 x the images/s). Part of the cache key: features of another precision are
    # extracted again, never mixed. "none" by default: the recorded results use float32 features.
    autocast: str = "none"
    # Channels the features keep: None = all D' of the backbone; k < D' = a random projection to k channels, by a
    # (D', k) matrix with orthonormal columns drawn from `project_seed`: the same at every site, as the federation's
    # head must read the same channels everywhere (a per-site PCA would not). Applied where the backbone runs
    # (extraction, prediction, exported models); part of the cache key. k / D' of the cache's disk and of the
    # head's first layer; 192 of ViT-S/14's 384 cost nothing measurable on camvid's development split
    # (docs/results.md, section 11).
    project_dim: int | None = None
    project_seed: int = 0  # seed of the projection matrix of project_dim (the job's, so the same at every site)

    def validate(self) -> None:
        if self.sha256 is not None and len(self.sha256) != 64:
            raise ConfigError("backbone.sha256 must be 64 hex digits")
        if self.project_dim is not None and self.project_dim < 1:
            raise ConfigError("backbone.project_dim must be >= 1 (or null: all of the backbone's channels)")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"backbone.autocast must be one of {AUTOCAST_DTYPES}, got {self.autocast!r}")


BAD_IMAGE_POLICIES = ("fail", "skip")


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how images become backbone inputs."""

    # a folder of <root>: the meta.json layout, else a plain folder of unlabeled images (datasets.ImageFolderDataset);
    # or "cityscapes" / "cocostuff27"
    dataset: str = "camvid"
    root: str | None = None  # folder of one folder per dataset; None: $FUSS_DATA_ROOT, else the shared data folder
    train_size: int = 224  # each five-crop view is resized to this (a multiple of the patch size)
    crop_ratio: float = 0.5  # five-crop side = crop_ratio * short side
    eval_short_side: int = 322  # evaluation: whole image, short side resized to this (rounded to patch size)
    # Evaluation, prediction and exported models average the cluster scores of the image and of its mirror image
    # (left-right flip; test-time augmentation, as STEGO). Doubles the evaluation extraction and prediction time;
    # chosen on the development split (docs/results.md, section 8).
    eval_flip: bool = True
    # An image whose file is missing or unreadable, or (for evaluation) whose label is missing, not one channel or
    # not the image's size. These are checked from the file headers before any extraction, and reading the image
    # checks it again. "fail" stops at the first problem, naming the file. "skip" leaves the image out and lists
    # it as `skipped_images` ({site: {id: reason}}): in the log, in the JSON line of `fuss extract`, `fuss train`
    # and `fuss evaluate`, and in the metrics.json of the latter two. Not part of the cache key.
    on_bad_image: str = "fail"
    # Images a backbone batch at extraction; None: 4 on the CPU, 16 on a GPU. Not part of the cache key.
    extract_batch: int | None = None
    # DataLoader worker processes that decode and resize images while the backbone computes; None: 0 on the CPU
    # (the backbone uses every core), up to 4 on a GPU; never more than the site's cores. Not part of the cache key.
    extract_workers: int | None = None

    def validate(self) -> None:
        if self.extract_batch is not None and self.extract_batch < 1:
            raise ConfigError("data.extract_batch must be >= 1 (or null for the device's default)")
        if self.extract_workers is not None and self.extract_workers < 0:
            raise ConfigError("data.extract_workers must be >= 0 (or null for the device's default)")
        if self.train_size <= 0 or self.eval_short_side <= 0:
            raise ConfigError("data.train_size and data.eval_short_side must be positive")
        if not 0.0 < self.crop_ratio <= 1.0:
            raise ConfigError("data.crop_ratio must be in (0, 1]")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")


SHIFT_MODES = ("fixed", "quantile")


@dataclass
class LossConfig:
    """Correspondence-distillation loss (paper Eq. 6): weight w and shift b of each of the three terms."""

    self_weight: float = 1.0  # w of the self term (a view with itself)
    knn_weight: float = 0.5775  # w of the kNN term (a view with one of its `train.knn` nearest views)
    random_weight: float = 0.9059  # w of the random term (a view with `train.num_random` random other views)
    # "fixed": use the *_shift values below (STEGO Cityscapes, tuned for DINO ViT-B/8).
    # "quantile": label-free; each shift is the quantile of that term's feature correlations A on the client's
    # own cache such that the fraction *_attract of pairs attracts (A - b > 0). See docs/architecture.md.
    shift_mode: str = "quantile"
    self_shift: float = 0.4583  # b of the self term with shift_mode "fixed"
    knn_shift: float = 0.1754  # b of the kNN term with shift_mode "fixed"
    random_shift: float = 0.3136  # b of the random term with shift_mode "fixed"
    self_attract: float = 0.35  # share of self-term pairs that attract, with shift_mode "quantile"
    knn_attract: float = 0.25  # share of kNN-term pairs that attract, with shift_mode "quantile"
    random_attract: float = 0.08  # share of random-term pairs that attract, with shift_mode "quantile"
    grid: int = 11  # feature samples per side of the random grid
    pointwise: bool = True  # "pointwise" centering of A

    def validate(self) -> None:
        if self.shift_mode not in SHIFT_MODES:
            raise ConfigError("loss.shift_mode must be 'fixed' or 'quantile'")
        for key in ("self_attract", "knn_attract", "random_attract"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"loss.{key} must be in (0, 1)")
        if self.grid < 1:
            raise ConfigError("loss.grid must be >= 1")


OBJECTIVES = ("stego", "smooseg", "primaps", "ppap")
PRECISIONS = ("float32", "bfloat16", "auto")
FEATURE_STORAGE = ("auto", "memory", "stream")
CENTROID_MODES = ("learned", "kmeans")


def _check_lr(section: str, obj: Any) -> None:
    for key in ("lr_head", "lr_prototypes"):
        if not getattr(obj, key) > 0:
            raise ConfigError(f"{section}.{key} must be > 0")


@dataclass
class SmoosegConfig:
    """SmooSeg (Lan et al., NeurIPS 2023): smoothness prior, teacher/student prototypes (docs/objectives.md).

    Shifts as in the authors' Cityscapes / COCO-Stuff configuration: the within-image term uses -0.02 (Potsdam:
    0.1) and the cross-image term 0.5 (COCO-Stuff: 0.48). The head dimension is ``train.dim`` (SmooSeg: 64).
    """

    within_shift: float = -0.02  # b of the smoothness term of an image with itself
    cross_shift: float = 0.5  # b of the smoothness term of an image with another image of the batch
    temperature: float = 0.1  # teacher soft assignment softmax(cos / T)
    teacher_ema: float = 0.998  # teacher <- ema * teacher + (1 - ema) * student, every step
    lr_head: float = 1e-4  # learning rate of the head
    lr_prototypes: float = 5e-4  # learning rate of the student prototypes

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError("train.smooseg.temperature must be > 0")
        if not 0.0 <= self.teacher_ema < 1.0:
            raise ConfigError("train.smooseg.teacher_ema must be in [0, 1)")
        _check_lr("train.smooseg", self)


@dataclass
class PrimapsConfig:
    """PriMaPs-EM (Hahn et al., arXiv 2404.16818): principal mask proposals + stochastic EM prototypes."""

    threshold: float = 0.4  # psi: a mask holds the positions with cosine >= psi * max to its anchor feature
    coverage: float = 0.95  # stop proposing masks once this fraction of an image's positions is covered
    max_masks: int = 16  # at most this many masks per image (bounds the cost on a noisy image)
    focal_gamma: float = 2.0  # class weight (1 - mean confidence of the class) ** gamma
    temperature: float = 0.1  # logits = cos(code, prototype) / T
    ema_decay: float = 0.98  # momentum prototypes <- decay * momentum + (1 - decay) * fast ...
    ema_every: int = 10  # ... every this many steps
    kmeans_iters: int = 10  # round 0: cosine k-means iterations on the first batch's codes; 0 = off
    lr_head: float = 5e-4  # learning rate of the head
    lr_prototypes: float = 5e-3  # learning rate of the fast prototypes

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError("train.primaps.threshold must be in (0, 1]")
        if not 0.0 < self.coverage <= 1.0:
            raise ConfigError("train.primaps.coverage must be in (0, 1]")
        if self.max_masks < 1 or self.ema_every < 1:
            raise ConfigError("train.primaps.max_masks and train.primaps.ema_every must be >= 1")
        if self.focal_gamma < 0 or self.kmeans_iters < 0:
            raise ConfigError("train.primaps.focal_gamma and train.primaps.kmeans_iters must be >= 0")
        if not self.temperature > 0:
            raise ConfigError("train.primaps.temperature must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.primaps.ema_decay must be in [0, 1)")
        _check_lr("train.primaps", self)


@dataclass
class PpapConfig:
    """PPAP (Seong et al., ECCV 2024): progressive proxy anchor propagation; authors' Cityscapes values."""

    positive_threshold: float = 0.6  # initial positiveness boundary (COCO-Stuff: 0.55)
    ambiguity_threshold: float = 0.2  # initial lower edge of the ambiguity zone (COCO-Stuff: 0.15)
    propagation_steps: int = 3  # proxy relocations (COCO-Stuff: 2)
    sigma_positive: float = 3.0  # the positiveness boundary drops by (1 - cos moved) / sigma_positive per step
    sigma_ambiguity: float = 3.0  # the ambiguity edge rises by (1 - cos moved) / sigma_ambiguity (COCO-Stuff: 4)
    temperature: float = 0.8  # softmax temperature of the proxy-anchor loss
    anchor_fraction: float = 0.0625  # share of the batch's patches used as anchors (Cityscapes 1/16, COCO 1/4)
    lr_head: float = 1e-3  # learning rate of the head
    lr_prototypes: float = 1e-3  # learning rate of the centroids (cluster loss on the detached codes)

    def validate(self) -> None:
        if not -1.0 <= self.ambiguity_threshold <= self.positive_threshold <= 1.0:
            raise ConfigError("train.ppap.ambiguity_threshold <= train.ppap.positive_threshold must lie in [-1, 1]")
        if self.propagation_steps < 0:
            raise ConfigError("train.ppap.propagation_steps must be >= 0")
        for key in ("sigma_positive", "sigma_ambiguity", "temperature"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"train.ppap.{key} must be > 0")
        if not 0.0 < self.anchor_fraction <= 1.0:
            raise ConfigError("train.ppap.anchor_fraction must be in (0, 1]")
        _check_lr("train.ppap", self)


@dataclass
class TrainConfig:
    """Local training of head and centroids on one client's cached features."""

    # Client objective (docs/objectives.md): "stego" = FUSS's correspondence distillation + centroid loss (the
    # settings below and `loss`); "smooseg", "primaps", "ppap" use their own section below. Every objective trains
    # the same head and (C, D) centroids, so aggregation and evaluation do not depend on it.
    objective: str = "stego"
    dim: int = 70  # D, output channels of the projection head
    num_clusters: int | None = None  # |C|; None = number of classes of the dataset
    batch_size: int = 8  # training views (five-crop views of the cached images) per local step
    lr_head: float = 5e-4  # learning rate of the head, stego (the other objectives: their own section)
    lr_centroids: float = 5e-3  # learning rate of the centroids, stego
    dropout: float = 0.1  # dropout of the projection head's input
    # weight of the inter-centroid similarity term (paper Eq. 5; stego and ppap); 0 = authors' code
    centroid_lambda: float = 0.0
    knn: int = 7  # k of each view's nearest views (cosine of mean-pooled features), built with the cache
    num_random: int = 5  # random other views per view of the batch (stego's random term)
    # Every this many steps a centroid that was nobody's argmax since the last check is moved onto the worst
    # explained feature of the batch (keeps all |C| clusters alive); 0 = off. stego and ppap (whose centroids are
    # trained by the centroid loss); smooseg / primaps prototypes move by EMA and are not reseeded.
    reseed_dead_every: int = 25
    # How a round ends for the centroids (stego and ppap): "learned" keeps the centroids of the centroid loss
    # (paper Eq. 5); "kmeans" then refits them by cosine k-means (Lloyd steps started from the learned centroids,
    # so indices still correspond across sites for FedAvg) on a sample of the site's own head codes. With FedCC the
    # server then clusters the sites' k-means centroids: federated k-means of the codes (docs/results.md, quality).
    centroids: str = "learned"
    centroid_refit_iters: int = 30  # centroids "kmeans": Lloyd steps of the refit
    centroid_refit_points: int = 100_000  # centroids "kmeans": at most this many head codes sampled for the refit
    fedprox_mu: float = 0.0  # FedProx: mu/2 * ||theta - theta_global||^2 on the head; authors use 0.001
    moon_weight: float = 0.0  # FedMoon contrastive term weight (paper: 1.0); 0 = off
    moon_tau: float = 0.5  # FedMoon temperature
    seed: int = 0  # seed of a site's local draws (batches, grids, calibration), combined with its name and round
    device: str = "auto"  # "auto" = cuda when present, else cpu
    # Where a site's training views live while it trains: "memory" (one pool, allocated once), "stream" (read a
    # batch at a time from the cache files, a thread ahead; memory stays at a few batches for any site size), or
    # "auto": memory when the pool (1.2 x its size at load) fits train.memory_budget_gb, else stream. Both give the
    # same result.
    feature_storage: str = "auto"
    memory_budget_gb: float | None = None  # what training may hold; None: half of the machine's memory
    # Precision of the head's matrix products in training: "float32", "bfloat16", or "auto" = bfloat16 where the
    # device computes it natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX), else float32. Losses,
    # optimiser state and the model that travels stay float32. "auto" is the default because camvid's development
    # federation ends within seed noise of float32 (docs/results.md, section 11).
    precision: str = "auto"
    smooseg: SmoosegConfig = field(default_factory=SmoosegConfig)
    primaps: PrimapsConfig = field(default_factory=PrimapsConfig)
    ppap: PpapConfig = field(default_factory=PpapConfig)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for section in (self.smooseg, self.primaps, self.ppap):
            section.validate()
        if self.dim < 1 or self.batch_size < 1 or self.knn < 1 or self.num_random < 1:
            raise ConfigError("train.dim, train.batch_size, train.knn and train.num_random must be >= 1")
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ConfigError("train.num_clusters must be >= 1")
        for key in ("lr_head", "lr_centroids"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be > 0")
        for key in ("fedprox_mu", "moon_weight", "centroid_lambda", "reseed_dead_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if self.centroids not in CENTROID_MODES:
            raise ConfigError(f"train.centroids must be one of {CENTROID_MODES}, got {self.centroids!r}")
        if self.centroid_refit_iters < 1 or self.centroid_refit_points < 1:
            raise ConfigError("train.centroid_refit_iters and train.centroid_refit_points must be >= 1")
        if self.moon_tau <= 0:
            raise ConfigError("train.moon_tau must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("train.dropout must be in [0, 1)")
        if self.feature_storage not in FEATURE_STORAGE:
            raise ConfigError(f"train.feature_storage must be one of {FEATURE_STORAGE}, got {self.feature_storage!r}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError("train.memory_budget_gb must be > 0 (or null: half of the machine's memory)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


AGGREGATORS = ("fedavg", "fedcc-kmeans", "fedcc-maximin")
EXPORT_FORMATS = ("torchscript", "onnx")  # fuss_components.export writes each
ROBUST_MODES = ("none", "median", "trimmed-mean", "clip")


@dataclass
class FederationConfig:
    """Server-side aggregation and round schedule (Algorithm 1)."""

    # How the server merges the clients' centroids: "fedavg" = their weighted mean, like the head (Eq. 8);
    # "fedcc-kmeans" / "fedcc-maximin" = FedCC: cluster all clients' centroids into |C| by k-means / by maximin.
    aggregator: str = "fedcc-kmeans"
    weighted: bool = True  # W: alpha_k = N_k / N (sample counts) instead of 1/|K|
    average_head: bool = True  # E: average the head; off = every client keeps its own head
    aggregate_centroids: bool = True  # C: aggregate the centroids; off = every client keeps its own
    rounds: int = 10  # federated rounds (each: local training at every training site, then aggregation)
    local_epochs: float = 1.0  # local steps per round = ceil(local_epochs * samples / batch_size) ...
    local_steps: int | None = None  # ... unless this is set
    # Most local steps of a round, whatever a site's size (None: no cap). A 100k-image site would otherwise train
    # 62,500 steps a round at local_epochs=1 and stall every round; the cap also bounds how far screening lets a
    # head move (change_bound grows with the steps: at most 1.5 x sqrt(5) = 3.4 here, whatever a site declares).
    max_local_steps: int | None = 5000
    kmeans_n_init: int = 10  # k-means restarts of "fedcc-kmeans" on the server
    # GPU memory (GiB) the job asks of each site, as FLARE's resource_spec (one GPU a site): FLARE then starts the
    # job only where a site's GPUResourceManager (local/resources.json) has such a GPU free, and gives the site's
    # job process that GPU (CUDA_VISIBLE_DEVICES). None: no resource_spec, the job runs on whatever a site has.
    # What a site needs: docs/deployment.md, "A site's GPU".
    site_gpu_memory_gb: float | None = None
    min_clients: int | None = None  # accepted updates a round needs; None = all training clients
    seed: int = 0  # seed of the initial global model, the server's clustering and the partitions
    # Robust aggregation of the head (fuss_components.aggregation): "none" = FedAvg (Eq. 8); "median" /
    # "trimmed-mean" = unweighted coordinate-wise median / trimmed mean of the heads; "clip" = FedAvg after
    # clipping each head's change from the global head to the round's median change.
    robust: str = "none"
    # robust "trimmed-mean": share of the clients cut at EACH end per coordinate (rounded up, at most (n - 1) // 2)
    trim_fraction: float = 0.2
    # Screening rejects updates whose centroids lie more than this many times the median distance from the
    # clients' median centroids (needs >= 3 updates), whenever the sites start from the global centroids (switch C
    # on) or robust is not "none".
    centroid_outlier_ratio: float = 3.0
    # Screening of every update, in every mode (fuss_components.screening.screen_updates): the largest
    # num_samples an update may claim (it may also not exceed what the site declared when the job started). 10
    # million is ~85x COCO's whole train2017 (118k images), the largest set any preset splits, so no honest site
    # comes near it; a larger count is corrupt or hostile. It also keeps every count far inside float64's exact
    # integers (2**53).
    max_samples: int = 10_000_000
    # Screening: the longest centroid row accepted, by the server and by a site's result filter. Centroids
    # are compared by cosine and stay near unit norm (honest rows after a round: 0.85-1.94); the bound only has to
    # refuse overflow-sized rows (3e38) while leaving room for a site's own privacy noise, which adds about
    # sigma * C * sqrt(D) (840 for sigma * C = 100, D = 70).
    max_centroid_norm: float = 1e4
    # Screening: the largest ||head - global head|| / ||global head|| accepted (works with any number of
    # clients). A sign-flipped head is at >= 2.0 (measured 2.00-2.18) and a 100x scaled one at ~99. Honest heads
    # measured per round: 0.01-0.10 on the tiny test federation (3-30 local steps, every objective); on CamVid
    # 0.17-0.35 for stego at local_epochs=1 (64-191 steps), 0.76 at 800 steps, ppap 0.54 / 0.97 at 191 / 800.
    # 1.5 sits between the two.
    max_relative_change: float = 1.5
    # ... for rounds of up to this many local steps; beyond, the bound grows with sqrt(steps / this), as honest
    # drift does, so that a site of any size is accepted (docs/reliability.md, long rounds). Screening also
    # rejects a head that points away from the global head (cosine <= 0), at any number of steps.
    relative_change_steps: int = 1000

    def validate(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"federation.aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.rounds < 1:
            raise ConfigError("federation.rounds must be >= 1")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError("federation.local_steps must be >= 1")
        if self.max_local_steps is not None and self.max_local_steps < 1:
            raise ConfigError("federation.max_local_steps must be >= 1 (or null: no cap)")
        if self.local_epochs <= 0:
            raise ConfigError("federation.local_epochs must be > 0")
        if self.kmeans_n_init < 1:
            raise ConfigError("federation.kmeans_n_init must be >= 1")
        if self.site_gpu_memory_gb is not None and not self.site_gpu_memory_gb > 0:
            raise ConfigError("federation.site_gpu_memory_gb must be > 0 (or null: no GPU asked of the sites)")
        if self.min_clients is not None and self.min_clients < 1:
            raise ConfigError("federation.min_clients must be >= 1")
        if self.robust not in ROBUST_MODES:
            raise ConfigError(f"federation.robust must be one of {ROBUST_MODES}, got {self.robust!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"federation.trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if not self.centroid_outlier_ratio > 1.0:
            raise ConfigError(f"federation.centroid_outlier_ratio must be > 1, got {self.centroid_outlier_ratio!r}")
        # float64 holds every integer up to 2**53 exactly: beyond it counts could no longer be told apart
        if not 1 <= self.max_samples <= 2**53:
            raise ConfigError(f"federation.max_samples must be in [1, 2**53], got {self.max_samples!r}")
        if not self.max_centroid_norm > 0:
            raise ConfigError(f"federation.max_centroid_norm must be > 0, got {self.max_centroid_norm!r}")
        if not self.max_relative_change > 0:
            raise ConfigError(f"federation.max_relative_change must be > 0, got {self.max_relative_change!r}")
        if self.relative_change_steps < 1:
            raise ConfigError(f"federation.relative_change_steps must be >= 1, got {self.relative_change_steps!r}")


@dataclass
class FussConfig:
    """Every setting of a run; nested sections, dotted keys on the command line (``--set train.lr_head=1e-4``)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    # Which images each site holds: a preset of fuss_components.presets.PRESETS (a dataset's name, with ":N"
    # for N clients where the preset allows it, e.g. "cityscapes:6"); "site": one client per site of the dataset,
    # sites whose images are all in split "test" only validate; or the path of a partition manifest JSON
    # (`fuss partition`).
    partition: str = "camvid"
    # the site's feature-cache folder; None: $FUSS_CACHE_DIR, else ~/.cache/fuss (fuss_components.paths.cache_dir)
    cache_dir: str | None = None

    def validate(self) -> "FussConfig":
        for section in (self.backbone, self.data, self.loss, self.train, self.federation):
            section.validate()
        self._check_objective_settings()
        return self

    def _check_objective_settings(self) -> None:
        """Stego's settings (``train.lr_head`` ...) changed from their defaults while ``train.objective`` does not
        read them would silently do nothing: ConfigError naming the key. Who reads what: trainer.py."""
        objective = self.train.objective
        if objective == "stego":
            return
        still_read = {"ppap": {"train.centroid_lambda", "train.reseed_dead_every", "train.centroids",
                               "train.centroid_refit_iters", "train.centroid_refit_points"},  # stego's centroids
                      "smooseg": {"loss.pointwise"}, "primaps": set()}[objective]
        stego_settings = [("train", TrainConfig(), ["lr_head", "lr_centroids", "num_random", "centroid_lambda",
                                                    "reseed_dead_every", "centroids", "centroid_refit_iters",
                                                    "centroid_refit_points"]),
                          ("loss", LossConfig(), [f.name for f in dataclasses.fields(LossConfig)])]
        for section, defaults, names in stego_settings:
            for name in names:
                key = f"{section}.{name}"
                value, default = getattr(getattr(self, section), name), getattr(defaults, name)
                if key not in still_read and value != default:
                    raise ConfigError(f"{key}={value!r} has no effect with train.objective={objective!r}: leave it at "
                                      f"its default {default!r} ({objective}'s own settings are train.{objective}.*)")

    def check_sites(self, num_training_sites: int) -> "FussConfig":
        """Checks that need the partition (how many training sites there are); ConfigError naming the key.

        * A partition without any training site has nothing to federate.
        * ``federation.min_clients`` larger than the partition's training sites can never be met: every round
          would fail after all the work, so fail now.

        (FedCC's pool of accepted centroids, ``clients x |C|`` rows clustered into ``|C|``, is never smaller than
        ``|C|`` once one site trains: screening rejects any other centroid count.)
        """
        if num_training_sites < 1:
            raise ConfigError(f"partition {self.partition!r} has no training site: nothing to federate")
        fed = self.federation
        if fed.min_clients is not None and fed.min_clients > num_training_sites:
            raise ConfigError(f"federation.min_clients={fed.min_clients} exceeds the {num_training_sites} training "
                              f"site(s) of partition {self.partition!r}")
        return self

    def round_steps(self, num_images: int) -> int:
        """Local steps of a round at a site of ``num_images`` training images: ``federation.local_steps``, else
        ``ceil(local_epochs * views / batch_size)`` (five views an image); at most ``federation.max_local_steps``."""
        import math

        from .views import VIEWS_PER_IMAGE

        fed = self.federation
        if fed.local_steps is not None:
            steps = fed.local_steps
        else:
            steps = max(1, math.ceil(fed.local_epochs * num_images * VIEWS_PER_IMAGE / self.train.batch_size))
        return steps if fed.max_local_steps is None else min(steps, fed.max_local_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "FussConfig":
        """Build and validate a config from nested dicts; unknown keys and wrong types raise ConfigError."""
        return _build(cls, data or {}, prefix="").validate()

    @classmethod
    def load(cls, path: str | Path) -> "FussConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def with_overrides(self, overrides: dict[str, Any]) -> "FussConfig":
        """Return a copy with dotted-key overrides applied, e.g. {"train.lr_head": 1e-4}."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(_unknown_key(dotted, _dotted_keys(data)))
                node = node[part]
            if leaf not in node:
                raise ConfigError(_unknown_key(dotted, _dotted_keys(data)))
            node[leaf] = value
        return FussConfig.from_dict(data)


def config_value(cfg: FussConfig, dotted: str) -> Any:
    """The value of one dotted key of ``cfg`` (``"data.root"``); ConfigError naming the key when there is none."""
    node: Any = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(_unknown_key(dotted, _dotted_keys(cfg.to_dict())))
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """One ``--set KEY=VALUE`` item -> ``(dotted key, value)``. The value is read as JSON when it is JSON
    (``3``, ``true``, ``null``, ``[1, 2]``), else kept as a string, so bare strings need no quotes
    (``data.dataset=polyp``). ConfigError when there is no ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_overrides(items: typing.Iterable[str] | None) -> dict[str, Any]:
    """``--set`` items (repeatable; a later key wins) -> ``{dotted key: value}`` for ``FussConfig.with_overrides``."""
    return dict(parse_override(item) for item in items or ())


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a nested config dict, dotted (``train.lr_head``)."""
    keys = []
    for name, value in data.items():
        keys += _dotted_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return keys


def did_you_mean(key: str, known: typing.Iterable[str]) -> str | None:
    """``"did you mean 'a' or 'b'?"`` naming the known keys closest to ``key`` (at most three); None when none is
    close. Config keys and the keys of a dataset's ``meta.json`` share it."""
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(k) for k in close)}?" if close else None


def _unknown_key(key: str, known: typing.Iterable[str]) -> str:
    """The error text for an unknown key: the closest known keys, else the keys of its section."""
    known = sorted(known)
    suggestion = did_you_mean(key, known)
    if suggestion:
        return f"unknown config key {key!r}; {suggestion}"
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section] or known
    return f"unknown config key {key!r} (known: {', '.join(siblings)})"


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(_unknown_key(prefix + unknown[0], [prefix + k for k in known]))
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} must not be null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {key!r} must be {names}, got {type(value).__name__} {value!r}")


# ====================================================================== the reference (docs/config.md)
# The keys that take one of a few strings, with the tuples their validate() checks.
CHOICES = {"data.on_bad_image": BAD_IMAGE_POLICIES, "loss.shift_mode": SHIFT_MODES, "train.objective": OBJECTIVES,
           "train.centroids": CENTROID_MODES, "federation.aggregator": AGGREGATORS, "federation.robust": ROBUST_MODES}
REFERENCE_COMMAND = "python -m fuss_components.config --markdown > docs/config.md"


def field_comments(cls: type) -> dict[str, str]:
    """Each field of a config dataclass -> its description: the comment lines right above the field and the
    comment at the end of its line, joined. The comments of this file are the documentation of the keys (one place
    per fact); :func:`render_reference` turns them into ``docs/config.md``."""
    source = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
    comments = {}  # line -> (text, whether the line holds nothing but the comment)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), not token.line[:token.start[1]].strip())
    described, previous_end = {}, 0
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [text for line, (text, alone) in sorted(comments.items()) if alone
                     and previous_end < line < node.lineno]
            after = [text for line, (text, alone) in sorted(comments.items()) if not alone
                     and node.lineno <= line <= node.end_lineno]
            described[node.target.id] = " ".join(above + after)
        previous_end = node.end_lineno
    return described


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if o is type(None) else o.__name__ for o in options)


def _cell(text: str) -> str:
    """Table-cell text: ``|`` would end the cell, ``*`` could start emphasis and ``<`` an HTML tag."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "\\<")


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of ``cls`` and of every section nested in it, depth first."""
    hints = typing.get_type_hints(cls)
    found = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += _sections(hints[f.name], f"{prefix}{f.name}.")
    return found


def render_reference() -> str:
    """``docs/config.md``: every key (dotted), its type, its default and what it does, section by section, from
    the fields, defaults and comments of this module (``python -m fuss_components.config --markdown``)."""
    out = ["# Configuration reference", "",
           "Generated from `fuss_components/config.py` by", "", "```bash", REFERENCE_COMMAND, "```", "",
           "Edit the comments there, not this file (`tests/test_config.py` checks that it is current).", "",
           "A run's configuration is one JSON object of the sections below (`--config FILE.json`, nested as the",
           "dotted keys are). Every command also takes `--set KEY=VALUE` with a dotted key (`--set",
           "train.lr_head=1e-4`; the value is read as JSON when it is JSON, else as a string), and a FLARE site",
           "applies its own `{\"dotted key\": value}` overrides from the JSON file named by `$FUSS_SITE_CONFIG`.",
           "An unknown key (with the closest known keys), a wrong type or an impossible value stops every command",
           "before any work, naming the key. None in a description is `null` in JSON.", ""]
    for prefix, cls in _sections(FussConfig):
        hints, described, defaults = typing.get_type_hints(cls), field_comments(cls), cls()
        doc = " ".join(line.strip() for line in inspect.getdoc(cls).splitlines() if line.strip())
        out += [f"## {prefix.rstrip('.') or 'top level'}", "", doc, "",
                "| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            key = prefix + f.name
            text = described[f.name]
            if key in CHOICES:
                text += f" One of {', '.join(json.dumps(c) for c in CHOICES[key])}."
            default = json.dumps(getattr(defaults, f.name))
            out.append(f"| `{key}` | {_type_name(hints[f.name])} | `{default}` | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fuss_components.config",
                                     description="Print the configuration reference (docs/config.md).")
    parser.add_argument("--markdown", action="store_true", required=True, help="as Markdown")
    parser.parse_args()
    print(render_reference(), end="")
