"""One federation site, independent of transport: its images, its feature cache, its local trainer.

The FLARE executor (``fuss_flare.executor``) and the in-process runners both drive sites through this class.

Resume. The only state a site carries from one round to the next is the trainer's ``previous_state`` (MOON's
negative; the kept head / centroids when switch E or C is off); the optimisers are re-created every round (the
FedAvg convention) and the calibrated shifts and every random draw are recomputed from (seed, site, round). When
``previous_state`` matters, :meth:`Site.train` writes it after each round to the site's own disk,
``<cache dir>/site_state/<run key>/<site>/round_<r>.pt`` (the run key hashes the configuration except the number
of rounds and the paths, plus the site's image ids), and a fresh process that is asked for round ``r > 0`` loads
round ``r - 1`` from there: a job stopped after round k and restarted continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbones import feature_dim
from .cache import CacheError, FeatureCache
from .config import FussConfig
from .datasets import DataError, SegmentationDataset, open_dataset
from .disclosure import DisclosurePolicy, check_job, site_policy
from .evaluate import evaluate_model
from .files import atomic_torch_save
from .head import FussModel
from .partition import Partition, partition_sites
from .presets import parse_partition_spec, preset_partition
from .paths import data_root
from .selection import SelectionProbe, as_metrics
from .trainer import LocalResult, LocalTrainer, resolve_device, stable_seed
from .views import VIEWS_PER_IMAGE, choose_storage, memory_budget, pool_bytes

log = logging.getLogger(__name__)

SIMULATOR_NAME = re.compile(r"^site-(\d+)$")


def open_site_dataset(cfg: FussConfig, site: str | None = None) -> SegmentationDataset:
    """Open the configured dataset; a missing root is an error naming the site and the path."""
    root = data_root(cfg.data.root)
    try:
        return open_dataset(cfg.data.dataset, root)
    except (DataError, FileNotFoundError) as err:
        who = f"site {site!r}: " if site else ""
        raise DataError(f"{who}cannot open dataset {cfg.data.dataset!r} under data root {root}: {err}") from err


def resolve_partition(cfg: FussConfig, dataset: SegmentationDataset | None = None) -> Partition:
    """``cfg.partition`` is a manifest path, a preset (``camvid``, ``cityscapes:6``, ...), or ``site``: one client
    per site, where sites whose images are all in split ``test`` are validation-only sites (``partition_sites``)."""
    spec = parse_partition_spec(cfg.partition)
    if spec.manifest is not None:
        return Partition.load(spec.manifest)
    dataset = dataset or open_site_dataset(cfg)
    if spec.is_site:
        return partition_sites(dataset, seed=cfg.federation.seed)
    return preset_partition(spec.preset, dataset, seed=cfg.federation.seed, num_clients=spec.clients)


def site_order(partition: Partition) -> list[str]:
    """Training sites, then validation-only sites: the order in which simulator names site-1.. map to them."""
    train = list(partition.clients)
    return train + [s for s in partition.validation if s not in partition.clients]


def flare_client_name(site: str) -> str:
    """The FLARE client name of a partition site: the site's own name, unless FLARE would read it as a number or
    a boolean (a client's name travels as ``uid=<name>`` on a start command line, and e.g. CamVid's ``0016E5``
    becomes the float 1.6e6 there): then ``site-<name>``."""
    try:
        float(site)
        numeric = True
    except ValueError:
        numeric = site.lower() in ("true", "false", "none", "null")
    return f"site-{site}" if numeric else site


def resolve_site_name(name: str, partition: Partition) -> str:
    """A partition site name, or its :func:`flare_client_name`, as the site; a simulator name ``site-N`` -> the
    N-th site of :func:`site_order`."""
    order = site_order(partition)
    if name in order:
        return name
    for site in order:
        if flare_client_name(site) == name:
            return site
    match = SIMULATOR_NAME.match(name)
    if match and 1 <= int(match.group(1)) <= len(order):
        return order[int(match.group(1)) - 1]
    raise DataError(f"site {name!r} is not in the partition (sites: {order})")


def num_clusters(cfg: FussConfig, dataset: SegmentationDataset | None = None) -> int:
    """|C|: configured, else the dataset's number of classes."""
    if cfg.train.num_clusters is not None:
        return cfg.train.num_clusters
    dataset = dataset or open_site_dataset(cfg)
    if not dataset.has_labels:
        raise DataError(f"dataset {dataset.name!r} has no labels, so its number of classes is unknown: set "
                        f"train.num_clusters")
    return dataset.num_classes


def build_model(cfg: FussConfig, clusters: int | None = None) -> FussModel:
    """An (untrained) FussModel shaped by the configuration."""
    t = cfg.train
    return FussModel(feature_dim(cfg.backbone), t.dim, clusters or num_clusters(cfg), t.dropout)


def init_global_state(cfg: FussConfig, clusters: int | None = None) -> dict[str, torch.Tensor]:
    """The seeded initial global model (unit-norm random centroids); identical wherever it is computed."""
    in_dim, t = feature_dim(cfg.backbone), cfg.train  # before seeding: may build (and cache) a timm model
    clusters = clusters or num_clusters(cfg)
    torch.manual_seed(stable_seed(cfg.federation.seed, "init"))
    model = FussModel(in_dim, t.dim, clusters, t.dropout)
    with torch.no_grad():
        model.centroids.copy_(F.normalize(model.centroids, dim=1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Site:
    """A site of the federation: trains on its ``clients`` images, validates on its ``validation`` images."""

    def __init__(self, cfg: FussConfig, name: str, partition: Partition | None = None,
                 dataset: SegmentationDataset | None = None, policy: DisclosurePolicy | None = None):
        """``policy``: the site's disclosure policy (``fuss_components.disclosure``; default
        :func:`~fuss_components.disclosure.site_policy`, i.e. ``$FUSS_SITE_POLICY`` or the defaults)."""
        self.cfg = cfg
        self.policy = policy or site_policy()
        self.dataset = dataset or open_site_dataset(cfg, name)
        self.partition = partition or resolve_partition(cfg, self.dataset)
        self.name = resolve_site_name(name, self.partition)
        self.train_ids = list(self.partition.clients.get(self.name, []))
        self.validation_ids = list(self.partition.validation.get(self.name, []))
        if self.validation_ids:  # fail before any extraction or training, not at the first validation
            self.dataset.require_labels(f"site {self.name!r} as a validation site")
        self.num_clusters = num_clusters(cfg, self.dataset)
        self.cache = FeatureCache(cfg, self.dataset.name)
        self.device = resolve_device(cfg.train.device)
        self._trainer: LocalTrainer | None = None
        self._selection_probe: SelectionProbe | None = None
        self._policy_checked = False

    def check_policy(self) -> None:
        """Refuse the job (``DisclosureError`` naming every setting) when it asks this site for more than its
        disclosure policy allows; called before the site extracts, trains or validates anything."""
        if not self._policy_checked:
            check_job(self.cfg, self.policy, self.name, feature_dim(self.cfg.backbone), self.num_clusters,
                      len(self.train_ids), len(self.validation_ids))
            self._policy_checked = True

    @property
    def is_training_site(self) -> bool:
        return bool(self.train_ids)

    @property
    def is_validation_site(self) -> bool:
        return bool(self.validation_ids)

    @property
    def num_samples(self) -> int:
        return len(self.train_ids)

    def _ids_by_kind(self) -> dict[str, list[str]]:
        """The cache kind each of the site's image sets needs: training views, evaluation views."""
        kinds = [("train", self.train_ids)] + [(kind, self.validation_ids) for kind in self.cache.eval_kinds]
        return {kind: ids for kind, ids in kinds if ids}

    def check_data(self, kinds: tuple[str, ...] = ("train", "eval", "mirror")) -> dict[str, dict[str, str]]:
        """Every check that can run before the backbone pass, on the site's images of the cache ``kinds``
        (``FeatureCache.check``: the images to extract, the validation labels): a problem stops it naming the
        file, or the image is skipped, per ``data.on_bad_image`` (see :attr:`skipped_images`). Returns the
        problems found now."""
        wanted = {kind: ids for kind, ids in self._ids_by_kind().items() if kind in kinds}
        return self.cache.check(self.dataset, wanted, self.name)

    def prepare(self, progress: bool = True) -> dict[str, int]:
        """:meth:`check_data`, then extract whatever features this site still lacks (training views and/or
        evaluation views); returns the count extracted per kind."""
        return self.cache.ensure_each(self.dataset, self._ids_by_kind(), device=self.device, progress=progress,
                                      desc=self.name)

    @property
    def skipped_images(self) -> dict[str, str]:
        """The site's images left out as bad (``data.on_bad_image = "skip"``): ``{id: reason naming the file}``."""
        return {i: reason for kind in self.cache.skipped.values() for i, reason in sorted(kind.items())}

    @property
    def trainer(self) -> LocalTrainer:
        if self._trainer is None:
            if not self.train_ids:
                raise DataError(f"site {self.name!r} has no training images in the partition")
            self.check_policy()
            # files present count as cached here: their one full read is the load below, which checks their sha256
            self.cache.ensure(self.dataset, self.train_ids, ["train"], device=self.device, desc=self.name,
                              verify=False)
            ids = self.cache.usable("train", self.train_ids)
            if len(ids) < len(self.train_ids):
                log.warning("site %s: %d of %d training images skipped: %s", self.name,
                            len(self.train_ids) - len(ids), len(self.train_ids), sorted(self.cache.skipped["train"]))
            if not ids:
                raise DataError(f"site {self.name!r}: none of its {len(self.train_ids)} training images is usable")
            _, dim, h, w = self.cache.expected_shape("train")
            tc = self.cfg.train
            budget = memory_budget(tc.memory_budget_gb)
            storage = choose_storage(tc.feature_storage, len(ids) * VIEWS_PER_IMAGE, dim, h, w, tc.batch_size,
                                     tc.num_random, budget, self.name)
            if storage == "stream":
                self.cache.memo_bytes = 0  # evaluation features are read per round, not kept
                log.info("site %s: %d training views (%.2f GB) exceed what the memory budget of %.2f GB holds: "
                         "streamed from the cache files", self.name, len(ids) * VIEWS_PER_IMAGE,
                         pool_bytes(len(ids) * VIEWS_PER_IMAGE, dim, h, w) / (1 << 30), budget / (1 << 30))

            def rebuild(bad: list[str]) -> None:  # files found damaged while loading: re-extracted, named
                self.cache.ensure(self.dataset, bad, ["train"], device=self.device, desc=self.name)

            feats = self.cache.load_train(ids, tc.knn, storage, self.device, rebuild)
            self._trainer = LocalTrainer(feats, self.cfg, self.name, self.num_clusters, self.policy)
        return self._trainer

    @property
    def keeps_local_state(self) -> bool:
        """Whether the trainer's previous local model feeds the next round (MOON, or switch E / C off)."""
        fed = self.cfg.federation
        return self.cfg.train.moon_weight > 0 or not fed.average_head or not fed.aggregate_centroids

    def state_dir(self) -> Path:
        """Where this site keeps its per-round local state (see the module docstring)."""
        cfg = self.cfg.to_dict()
        cfg["federation"].pop("rounds")
        cfg["data"].pop("root")
        cfg.pop("cache_dir")
        blob = json.dumps({"config": cfg, "site": self.name, "ids": self.train_ids}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        return self.cache.root / "site_state" / key / safe

    def _state_file(self, round_idx: int) -> Path:
        return self.state_dir() / f"round_{round_idx:04d}.pt"

    @property
    def selection_probe(self) -> SelectionProbe:
        """The label-free criteria of the received global models, on a subset of this site's training views
        seeded by ``train.seed`` and the site (``fuss_components.selection``)."""
        if self._selection_probe is None:
            self._selection_probe = SelectionProbe(self.trainer, stable_seed(self.cfg.train.seed, self.name,
                                                                             "selection"))
        return self._selection_probe

    def train(self, global_state: dict[str, torch.Tensor], round_idx: int) -> LocalResult:
        """One round of local training from the received global state (resumable, see the module docstring).

        The metrics carry ``skipped_images``: the number of training images left out as bad (``Site.skipped_images``
        lists them), and ``selection_*``: the label-free criteria of ``global_state`` itself, measured before
        training (``fuss_components.selection``)."""
        self.check_policy()
        trainer = self.trainer
        if self.keeps_local_state and trainer.previous_state is None and round_idx > 0:
            trainer.previous_state = self._load_state(round_idx - 1)
        criteria = self.selection_probe.measure(global_state, round_idx)
        result = trainer.train(global_state, round_idx)
        result.metrics.update(as_metrics(criteria))
        if self.keeps_local_state:
            self._save_state(round_idx, result.state)
        result.metrics["skipped_images"] = float(len(self.train_ids) - len(self.cache.usable("train", self.train_ids)))
        return result

    def _load_state(self, round_idx: int) -> dict[str, torch.Tensor] | None:
        path = self._state_file(round_idx)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            log.warning("site %s: no local state of round %d at %s; this round starts like round 0 (MOON without a "
                        "previous model, E/C-off switches from the global model), so a resumed run is not exact",
                        self.name, round_idx, path)
            return None
        except Exception as err:
            raise CacheError(f"site {self.name!r}: cannot read its local state {path}: {err}") from err
        if blob.get("round") != round_idx or blob.get("site") != self.name:
            raise CacheError(f"site {self.name!r}: {path} holds round {blob.get('round')} of site "
                             f"{blob.get('site')!r}, expected round {round_idx}")
        log.info("site %s: resumed its local state of round %d from %s", self.name, round_idx, path)
        return {k: v.clone() for k, v in blob["state"].items()}

    def _save_state(self, round_idx: int, state: dict[str, torch.Tensor]) -> None:
        folder = self.state_dir()
        path = self._state_file(round_idx)
        try:
            atomic_torch_save({"round": round_idx, "site": self.name, "state": state}, path)
            for old in folder.glob("round_*.pt"):  # keep this round and the one before
                if old.name < self._state_file(round_idx - 1).name:
                    old.unlink(missing_ok=True)
        except OSError as err:
            raise CacheError(f"site {self.name!r}: cannot write its local state {path}: {err}") from err

    def validate(self, global_state: dict[str, torch.Tensor], crf: bool = False, overlay_dir: str | Path | None = None,
                 num_overlays: int = 0, progress: bool = False) -> dict:
        """Hungarian-matched mIoU / pixel accuracy of ``global_state`` on this site's validation images."""
        self.check_policy()
        model = build_model(self.cfg, self.num_clusters)
        model.load_state_dict(global_state)
        return self.evaluate(model.to(self.device).eval(), crf=crf, overlay_dir=overlay_dir, num_overlays=num_overlays,
                             progress=progress)

    def evaluate(self, model, crf: bool = False, overlay_dir: str | Path | None = None, num_overlays: int = 0,
                 progress: bool = False) -> dict:
        """:func:`evaluate_model` of any segmenter on this site's usable validation images (their features
        extracted first); ``skipped_images`` counts those left out as bad."""
        if not self.validation_ids:
            raise DataError(f"site {self.name!r} has no validation images in the partition")
        self.cache.ensure(self.dataset, self.validation_ids, self.cache.eval_kinds, device=self.device,
                          desc=self.name)
        ids = self.cache.usable("eval", self.validation_ids)
        if not ids:
            raise DataError(f"site {self.name!r}: none of its {len(self.validation_ids)} validation images is usable")
        result = evaluate_model(model, self.dataset, ids, self.cache, self.num_clusters, crf=crf,
                                overlay_dir=overlay_dir, num_overlays=num_overlays, progress=progress)
        result["skipped_images"] = len(self.validation_ids) - len(ids)
        return result
