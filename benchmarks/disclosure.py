"""What a hostile job can learn from a site, before and after the site's disclosure policy
(``fuss_components.disclosure``), measured on one real camvid site.

Each probe is a job configuration (allowed hyperparameters only) or a global model a hostile server sends, run by the
installed trainer on the site's cached features. "before": the trainer as it was without the policy (the trained
centroids sent as they are, no bound on the settings); "after": the site's default policy (the job refused before
any work, naming the bound), and where a site allowed the setting, what the rule that every sent centroid is the mean
of >= 50 codes of >= 5 images leaves. The measure: the share of sent centroids within cosine 0.999 / 0.99 / 0.95 of
one single patch code of the site, under the head that was sent with them (the server knows it), or of one
backbone feature where the head is an identity. Results: ``docs/results/disclosure.json`` and the table of
``docs/deployment.md`` section 3.3.

    python -m benchmarks.disclosure --site 0006R0
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from fuss_components.backbones import feature_dim
from fuss_components.config import FussConfig
from fuss_components.disclosure import DisclosureError, DisclosurePolicy, Release, check_job
from fuss_components.files import atomic_write_json
from fuss_components.head import FussModel
from fuss_components.selection import CRITERIA, MAX_VIEWS
from fuss_components.site import Site, build_model, init_global_state
from fuss_components.trainer import LocalTrainer

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
THRESHOLDS = (0.999, 0.99, 0.95)
# the job: allowed hyperparameters only
ATTACK = {"train.num_clusters": 2000, "train.dim": 384, "train.dropout": 0.0, "train.reseed_dead_every": 1,
          "train.lr_head": 1e-9, "train.lr_centroids": 1e-9, "federation.local_steps": 1}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="0006R0", help="camvid training site attacked")
    parser.add_argument("--out", default=str(RESULTS / "disclosure.json"))
    return parser


@contextmanager
def no_release():
    """The trainer as it was before the policy: what it trained is what it sends."""
    original = LocalTrainer.release_centroids
    LocalTrainer.release_centroids = lambda self, model, received, seed: Release([], [], [])
    try:
        yield
    finally:
        LocalTrainer.release_centroids = original


@torch.no_grad()
def unit_codes(state: dict, trainer: LocalTrainer, in_dim: int, identity: bool = False) -> torch.Tensor:
    """Every patch code of the site's training views under the head of ``state`` (unit vectors); with
    ``identity`` the backbone features themselves."""
    model = FussModel(in_dim, state["head.linear.weight"].shape[0], state["centroids"].shape[0], 0.0)
    model.load_state_dict(state)
    model.eval()
    out = []
    for chunk in torch.arange(trainer.feats.num_views).split(64):
        feats = trainer._batch(chunk)
        codes = feats if identity else model(feats)
        out.append(F.normalize(codes.flatten(2).transpose(1, 2).flatten(0, 1), dim=1))
    return torch.cat(out)


@torch.no_grad()
def copy_shares(centroids: torch.Tensor, codes: torch.Tensor) -> dict[str, float]:
    """Share of centroid rows within each cosine threshold of one row of ``codes``; the largest cosine."""
    unit = F.normalize(centroids.float(), dim=1)
    best = torch.full((len(unit),), -1.0)
    for chunk in codes.split(32768):
        best = torch.maximum(best, (unit @ chunk.T).max(dim=1).values)
    shares = {f"within_{t}": float((best >= t).float().mean()) for t in THRESHOLDS}
    return {**shares, "max_cosine": float(best.max()), "centroids": len(unit)}


def refusal(cfg: FussConfig, site: Site, policy: DisclosurePolicy) -> str | None:
    """The site's refusal of ``cfg`` under ``policy`` (None: accepted)."""
    try:
        check_job(cfg, policy, site.name, feature_dim(cfg.backbone), cfg.train.num_clusters or site.num_clusters,
                  len(site.train_ids), len(site.validation_ids))
    except DisclosureError as err:
        return str(err).split(": ", 1)[1]
    return None


def identity_head(state: dict, in_dim: int, dim: int) -> dict:
    """A hostile server's global head: codes = the first ``dim`` feature channels (identity when dim = D')."""
    state = dict(state)
    state["head.linear.weight"] = torch.eye(dim, in_dim)[:, :, None, None]
    for key in ("head.linear.bias", "head.nonlinear.0.weight", "head.nonlinear.0.bias", "head.nonlinear.2.weight",
                "head.nonlinear.2.bias"):
        state[key] = torch.zeros_like(state[key])
    return state


def centroid_probe(base: FussConfig, site: Site, feats, name: str, overrides: dict, allowed: dict,
                   identity: bool = False) -> dict:
    """Train one round of the job ``overrides`` before (no release, no bound) and after (default policy; and a
    site that allowed ``allowed``'s bounds, with the job narrowed to them)."""
    in_dim = feature_dim(base.backbone)
    row = {"probe": name, "overrides": overrides}

    def run(cfg: FussConfig, policy: DisclosurePolicy, release: bool) -> dict:
        clusters = cfg.train.num_clusters
        trainer = LocalTrainer(feats, cfg, site.name, clusters, policy)
        state = init_global_state(cfg, clusters)
        if identity:
            state = identity_head(state, in_dim, cfg.train.dim)
        started = time.perf_counter()
        if release:
            result = trainer.train(state, 0)
        else:
            with no_release():
                result = trainer.train(state, 0)
        seconds = time.perf_counter() - started
        # under an identity head (D = D') the codes are the backbone features themselves
        shares = copy_shares(result.state["centroids"], unit_codes(result.state, trainer, in_dim))
        return {**shares, "replaced": int(result.metrics.get("centroids_replaced", 0)), "seconds": seconds}

    cfg = base.with_overrides(overrides)
    row["before"] = run(cfg, DisclosurePolicy(), release=False)
    row["after_default_policy"] = refusal(cfg, site, DisclosurePolicy()) or "accepted"
    narrowed = cfg.with_overrides(allowed.get("job", {}))
    policy = DisclosurePolicy(**allowed.get("policy", {}))
    row["after_allowed"] = {"policy": allowed.get("policy", {}), "job": allowed.get("job", {}),
                            "refused": refusal(narrowed, site, policy), **run(narrowed, policy, release=True)}
    return row


@torch.no_grad()
def head_update_probe(base: FussConfig, site: Site, feats) -> dict:
    """One local step with one query view and no dropout: how close does a row of the head's update (sent head
    minus received head, both known to the server) come to one backbone feature of the site?"""
    in_dim = feature_dim(base.backbone)
    out = {"probe": "head update of one step"}
    features = unit_codes(init_global_state(base), LocalTrainer(feats, base, site.name, 11), in_dim, identity=True)
    for label, overrides in (("one step, one view", {"federation.local_steps": 1, "train.batch_size": 1,
                                                     "train.dropout": 0.0}),
                             ("honest round", {})):
        cfg = base.with_overrides(overrides)
        state = init_global_state(cfg)
        with torch.enable_grad():
            result = LocalTrainer(feats, cfg, site.name, 11).train(state, 0)
        delta = (result.state["head.nonlinear.0.weight"] - state["head.nonlinear.0.weight"])[:, :, 0, 0]
        rows = delta[delta.norm(dim=1) > 0]
        out[label] = {**copy_shares(rows, features), "refused": refusal(cfg, site, DisclosurePolicy()),
                      "steps": int(result.metrics["steps"])}
    return out


def validation_probe(base: FussConfig, site_name: str = "Seq05VD") -> dict:
    """A job whose partition leaves a validation site one image: its per-class IoU names the classes of that
    image (NaN = absent) and their overlap."""
    site = Site(base, site_name)
    image = site.validation_ids[0]
    site.validation_ids = [image]
    model = build_model(base, site.num_clusters)
    model.load_state_dict(init_global_state(base))
    scores = site.evaluate(model.eval())
    labels = site.dataset.load_label(image)
    present = sorted(int(c) for c in set(labels.flatten().tolist()) if c != 255)
    positive = sorted(i for i, v in enumerate(scores["per_class_iou"]) if not math.isnan(v) and v > 0)
    return {"probe": "validation site of one image", "classes_in_image": present,
            "classes_with_positive_iou": positive, "all_in_image": set(positive) <= set(present),
            "share_of_image_classes_revealed": len(set(positive) & set(present)) / len(present),
            "after_default_policy": refusal(base, site, DisclosurePolicy()) or "accepted"}


def scalar_probe(base: FussConfig, site: Site, feats) -> dict:
    """How many scalars a site's round sends (training metrics and the label-free criteria), by local steps."""
    counts = {}
    for steps in (1, 50):
        cfg = base.with_overrides({"federation.local_steps": steps})
        trainer = LocalTrainer(feats, cfg, site.name, 11)
        counts[steps] = len(trainer.train(init_global_state(cfg), 0).metrics) + len(CRITERIA)
    images = len({i // 5 for i in range(min(MAX_VIEWS, feats.num_views))})
    return {"probe": "scalars a round sends", "per_round_by_local_steps": counts,
            "selection_positions_averaged": min(MAX_VIEWS, feats.num_views) * feats.geometry[1] * feats.geometry[2],
            "note": f"each label-free criterion is one mean over the positions of {MAX_VIEWS} views (here of up to "
                    f"{images} images); analytics leave once a round per declared tag"}


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = FussConfig()
    site = Site(base, args.site, policy=DisclosurePolicy())
    feats = site.trainer.feats
    # a site that allowed what the job asks for, up to the one bound no policy lifts (D <= D' / 2)
    lax = {"min_images": 1}
    wide = {"policy": {"max_clusters": 2000, "max_dim": 192, **lax}, "job": {"train.dim": 192}}
    probes = [
        centroid_probe(base, site, feats, "the issue's job", ATTACK, wide),
        centroid_probe(base, site, feats, "the issue's job, dropout 0.1", {**ATTACK, "train.dropout": 0.1}, wide),
        centroid_probe(base, site, feats, "k-means refit alone (2,000 clusters)",
                       {"train.num_clusters": 2000, "train.centroids": "kmeans", "federation.local_steps": 1,
                        "train.reseed_dead_every": 0}, {"policy": {"max_clusters": 2000, **lax}}),
        centroid_probe(base, site, feats, "identity head D = D' (server-chosen global head)",
                       {**ATTACK, "train.num_clusters": 64}, {"policy": {"max_dim": 192, **lax}, "job": {"train.dim": 192}},
                       identity=True),
    ]
    for objective in ("primaps", "ppap", "smooseg"):
        overrides = {"train.objective": objective, "train.num_clusters": 2000, "train.dropout": 0.0,
                     "federation.local_steps": 1}
        probes.append(centroid_probe(base, site, feats, f"{objective} prototypes (2,000 clusters, 1 step)",
                                     overrides, {"policy": {"max_clusters": 2000, **lax}}))
    probes.append(head_update_probe(base, site, feats))
    probes.append(validation_probe(base))
    probes.append(scalar_probe(base, site, feats))
    report = {"site": args.site, "images": len(site.train_ids), "views": feats.num_views,
              "default_policy": DisclosurePolicy().to_dict(), "probes": probes,
              "caveat": "backbone dinov2_vits14_imgfocus (DINOv2 ViT-S/14, very probably fine-tuned for saliency), "
                        "block 7; the shares depend on the codes' geometry, not on segmentation quality"}
    atomic_write_json(Path(args.out), report)
    for row in probes:
        print(row)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
