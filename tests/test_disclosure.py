"""The site's disclosure policy (fuss_components.disclosure): what a hostile job can make a site send, bounded.

Acts as the attacker of the issue would: a job configuration made only of allowed hyperparameters (2,000 clusters,
a head as wide as the features, no dropout, reseeding every step, learning rates of 1e-9, one local step) that
made a site send copies of its patch codes. The FLARE end-to-end version is in test_flare_sim.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from fuss_components import disclosure
from fuss_components.views import TrainFeatures
from fuss_components.config import FussConfig
from fuss_components.disclosure import DisclosureError, DisclosurePolicy, check_job, release_centroids
from fuss_components.head import FussModel
from fuss_components.site import Site, init_global_state, resolve_partition
from fuss_components.trainer import LocalTrainer
from fuss_components.wire import job_schema

HOSTILE = {"train.num_clusters": 2000, "train.dim": 384, "train.dropout": 0.0, "train.reseed_dead_every": 1,
           "train.lr_head": 1e-9, "train.lr_centroids": 1e-9, "federation.local_steps": 1}


def _pool(images: int = 40, dim: int = 32, side: int = 8, seed: int = 0) -> TrainFeatures:
    """Synthetic training views: ``images`` x 5 views of ``dim`` x side x side random features."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(images * 5, dim, side, side, generator=gen).half()
    ids = [f"img{i // 5}" for i in range(images * 5)]
    return TrainFeatures(feats, ids, torch.stack([(torch.arange(len(ids)) + j) % len(ids) for j in (1, 2)], 1))


def _codes(model: FussModel, feats: TrainFeatures) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        views = feats.views(torch.arange(feats.num_views))
        return F.normalize(model(views).flatten(2).transpose(1, 2).flatten(0, 1), dim=1)


def _copy_fraction(state: dict, feats: TrainFeatures, in_dim: int, dim: int, threshold: float) -> float:
    """Share of the sent centroids within cosine ``threshold`` of a single patch code of the site (under the
    head that was sent with them, as the server would compute it)."""
    model = FussModel(in_dim, dim, state["centroids"].shape[0], 0.0)
    model.load_state_dict(state)
    best = (F.normalize(state["centroids"], dim=1) @ _codes(model, feats).T).max(dim=1).values
    return float((best >= threshold).float().mean())


def _hostile_trainer(feats, policy: DisclosurePolicy, clusters: int = 300, objective: str = "stego"):
    hostile = dict(HOSTILE, **{"train.num_clusters": clusters, "train.dim": 32, "train.knn": 2})
    if objective != "stego":  # the other objectives read their own learning rates; smooseg / primaps no reseeding
        hostile = {k: v for k, v in hostile.items() if k.split(".")[1] not in ("lr_head", "lr_centroids")
                   and (objective == "ppap" or k != "train.reseed_dead_every")}
        hostile[f"train.{objective}.lr_head"] = 1e-9
    cfg = FussConfig().with_overrides({**hostile, "train.objective": objective})
    model = FussModel(32, 32, clusters, 0.0)
    return LocalTrainer(feats, cfg, "s1", clusters, policy), {k: v.detach() for k, v in model.state_dict().items()}


def test_release_sends_means_of_supported_centroids_and_the_received_rows_otherwise():
    codes = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 2 + [[0.8, 0.6]] * 4)
    images = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 3, 4, 5, 6])
    centroids = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.7, 0.7]])
    received = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [0.6, -0.8]])
    policy = DisclosurePolicy(min_support_codes=3, min_support_images=3, max_code_cosine=1.0)
    sent, release = release_centroids(codes, images, centroids, received, policy)
    assert release.support_codes == [6, 2, 4] and release.support_images == [3, 1, 4]
    assert release.replaced == [1]  # two codes of one image: not an aggregate
    assert torch.allclose(sent[0], torch.tensor([1.0, 0.0])) and torch.allclose(sent[2], torch.tensor([0.8, 0.6]))
    assert torch.equal(sent[1], received[1])
    assert "replaced by the received centroids: 1 (2 codes / 1 images" in release.describe(policy)


def test_a_mean_of_near_identical_codes_is_not_sent():
    """Enough codes from enough images, but all nearly the same patch (a static scene over frames): their mean is
    a near copy of each, so the site sends the received centroid instead; a spread cluster is sent."""
    gen = torch.Generator().manual_seed(0)
    axes = torch.eye(16)
    tight = axes[0] + 0.01 * torch.randn(60, 16, generator=gen)
    spread = axes[1] + 0.5 * torch.randn(60, 16, generator=gen) * (1 - axes[0])
    codes = torch.cat([tight, spread])
    images = torch.arange(120) % 10
    centroids = axes[:2]
    received = -axes[:2]
    policy = DisclosurePolicy(min_support_codes=50, min_support_images=5, max_code_cosine=0.98)
    assert DisclosurePolicy().max_code_cosine == 1.0  # off by default: honest centroids lie close to a code too
    sent, release = release_centroids(codes, images, centroids, received, policy)
    assert release.nearest_code[0] > 0.999 and release.nearest_code[1] < policy.max_code_cosine
    assert release.replaced == [0]
    assert torch.equal(sent[0], received[0])
    assert torch.allclose(sent[1], torch.nn.functional.normalize(
        torch.nn.functional.normalize(spread, dim=1).sum(0), dim=0))
    assert "nearest code 1.000" in release.describe(policy)
    with pytest.raises(ValueError, match="max_code_cosine must be a number in"):
        DisclosurePolicy(max_code_cosine=1.5)


def test_hostile_configuration_sends_no_copy_of_a_patch_code(monkeypatch):
    """The issue's attack on a site that allowed its cluster count: without the aggregate rule (the trainer as it
    was: the trained centroids sent as they are) most sent centroids are copies of single patch codes; with the
    default k = 50 codes from m = 5 images none lies within cosine 0.99 of one."""
    feats = _pool()
    leaky, state = _hostile_trainer(feats, DisclosurePolicy())
    with monkeypatch.context() as patch:
        patch.setattr(LocalTrainer, "release_centroids",
                      lambda self, model, received, seed: disclosure.Release([], [], []))
        sent = leaky.train(state, 0).state
    assert _copy_fraction(sent, feats, 32, 32, 0.999) > 0.3  # 45 % here: every dead centroid
    safe, state = _hostile_trainer(feats, DisclosurePolicy())
    result = safe.train(state, 0)
    assert _copy_fraction(result.state, feats, 32, 32, 0.99) == 0.0
    # about 12,800 codes in 300 clusters: most are too thin to be an aggregate and go back as received
    assert 0 < result.metrics["centroids_replaced"] <= 300 and result.release.replaced


@pytest.mark.parametrize("objective", ["smooseg", "primaps", "ppap"])
def test_every_objectives_prototypes_leave_as_aggregates(objective):
    """SmooSeg's teacher, PriMaPs' momentum prototypes and PPAP's centroids are what travels for those
    objectives: the same rule applies to them."""
    feats = _pool()
    trainer, state = _hostile_trainer(feats, DisclosurePolicy(), clusters=64, objective=objective)
    sent = trainer.train(state, 0).state
    assert _copy_fraction(sent, feats, 32, 32, 0.99) == 0.0


def test_the_attack_is_refused_before_any_work(tiny_data_root, tmp_path):
    """Under the default policy the issue's configuration never reaches extraction: every bound it breaks is
    named (clusters, head width; the tiny site's 6 images are also below min_images)."""
    cfg = tiny_config(tiny_data_root, tmp_path / "cache").with_overrides(HOSTILE)
    site = Site(cfg, "s1", resolve_partition(cfg), policy=DisclosurePolicy())
    with pytest.raises(DisclosureError) as err:
        site.train(init_global_state(cfg), 0)
    text = str(err.value)
    assert "site 's1' refuses the job" in text and "train.num_clusters=2000 exceeds the site's max_clusters=64" in text
    assert "train.dim=384 exceeds the widest head this site trains, 16" in text  # tiny ViT: 32 channels
    assert "the site trains on 6 images, fewer than its min_images=10" in text
    assert not (tmp_path / "cache").exists()


def test_the_main_jobs_settings_pass_the_default_policy():
    cfg = FussConfig()  # the camvid job's defaults: 11 clusters, D = 70, one local epoch
    check_job(cfg, DisclosurePolicy(), "0006R0", 384, 11, 101, 0)
    check_job(cfg, DisclosurePolicy(), "Seq05VD", 384, 11, 0, 171)


@pytest.mark.parametrize("overrides,counts,needle", [
    ({"train.dim": 193}, (101, 0), "train.dim=193 exceeds the widest head this site trains, 128"),
    ({"train.num_clusters": 65}, (101, 0), "max_clusters=64"),
    ({"federation.local_steps": 1}, (101, 0), "a round reads views of as few as 2 images"),
    ({"train.batch_size": 1, "federation.local_steps": 20}, (101, 0), "as few as 4 images"),
    ({}, (9, 0), "the site trains on 9 images, fewer than its min_images=10"),
    ({}, (0, 1), "the site validates on 1 images, fewer than its min_validation_images=10"),
])
def test_each_bound_refuses_naming_its_setting(overrides, counts, needle):
    cfg = FussConfig().with_overrides(overrides)
    clusters = cfg.train.num_clusters or 11
    with pytest.raises(DisclosureError, match="refuses the job") as err:
        check_job(cfg, DisclosurePolicy(), "site-a", 384, clusters, *counts)
    assert needle in str(err.value)


def test_min_local_steps_is_the_sites():
    cfg = FussConfig().with_overrides({"federation.local_steps": 20})
    check_job(cfg, DisclosurePolicy(), "a", 384, 11, 101, 0)
    with pytest.raises(DisclosureError, match="a round of 20 local step"):
        check_job(cfg, DisclosurePolicy(min_local_steps=50), "a", 384, 11, 101, 0)


def test_the_result_filter_lets_no_parameter_of_a_model_beyond_the_policy_leave(tiny_data_root, tmp_path):
    cfg = tiny_config(tiny_data_root, tmp_path / "cache")
    assert job_schema(cfg, "s1", policy=DisclosurePolicy()).shapes is not None
    schema = job_schema(cfg.with_overrides({"train.num_clusters": 2000}), "s1", policy=DisclosurePolicy())
    assert schema.shapes is None and "max_clusters=64" in schema.shapes_problem
    schema = job_schema(cfg.with_overrides({"train.dim": 17}), "s1", policy=DisclosurePolicy())
    assert schema.shapes is None and "train.dim=17" in schema.shapes_problem


def test_policy_comes_from_the_site_never_the_job(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    monkeypatch.delenv(disclosure.POLICY_ENV, raising=False)
    assert disclosure.site_policy(local) == DisclosurePolicy()  # no file: the defaults
    (local / disclosure.POLICY_FILE).write_text(json.dumps({"max_clusters": 12}))
    assert disclosure.site_policy(local).max_clusters == 12
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"min_images": 3}))
    monkeypatch.setenv(disclosure.POLICY_ENV, str(env_file))
    assert disclosure.site_policy(local) == DisclosurePolicy(min_images=3)  # the variable wins
    env_file.write_text(json.dumps({"max_cluster": 3}))
    with pytest.raises(ValueError, match=r"env.json: unknown key\(s\) \['max_cluster'\]"):
        disclosure.site_policy(local)
    env_file.write_text(json.dumps({"min_images": 0}))
    with pytest.raises(ValueError, match="min_images must be an integer >= 1"):
        disclosure.site_policy(local)


# ---------------------------------------------------------------------------------------------- site-owned keys

HOSPITAL = DisclosurePolicy(site_owned=disclosure.SITE_OWNED_KEYS)
SITE_OWN = {"data.root": "/hospital/data", "data.dataset": "chest", "partition": "site", "cache_dir": "/scratch"}


def test_a_job_cannot_point_a_hospital_at_another_folder():
    """The job's values of keys the site owns and sets are ignored, each named once for the audit log."""
    job = FussConfig().with_overrides({"data.root": "/mnt/other_hospital", "data.dataset": "camvid",
                                       "partition": "/mnt/other_hospital/partition.json", "train.dim": 64})
    cfg, notes = disclosure.site_config(job, SITE_OWN, HOSPITAL, "hospital-a")
    assert (cfg.data.root, cfg.data.dataset, cfg.partition, cfg.cache_dir) == ("/hospital/data", "chest", "site",
                                                                              "/scratch")
    assert cfg.train.dim == 64  # what is not the site's stays the job's
    assert len(notes) == 2, notes  # data.dataset: the job's is the default, nothing to say
    assert "ignores the job's data.root='/mnt/other_hospital'" in notes[0] and "'/hospital/data'" in notes[0]
    assert "partition='/mnt/other_hospital/partition.json'" in notes[1]


def test_a_job_cannot_fill_in_what_a_hospital_left_unset():
    job = FussConfig().with_overrides({"backbone.weights": "/mnt/job/weights.pth", "cache_dir": "/mnt/job/cache"})
    with pytest.raises(DisclosureError) as err:
        disclosure.site_config(job, {"data.root": "/hospital/data"}, HOSPITAL, "hospital-a")
    text = str(err.value)
    assert "site 'hospital-a' refuses the job" in text
    assert "backbone.weights='/mnt/job/weights.pth'" in text and "cache_dir='/mnt/job/cache'" in text
    # a job leaving them at their defaults runs, with the site's values
    cfg, notes = disclosure.site_config(FussConfig(), {"data.root": "/hospital/data"}, HOSPITAL, "hospital-a")
    assert cfg.data.root == "/hospital/data" and cfg.backbone.weights is None and notes == []


def test_a_site_that_owns_nothing_runs_the_jobs_values():
    job = FussConfig().with_overrides({"data.root": "/data", "backbone.weights": "/w.pth"})
    cfg, notes = disclosure.site_config(job, {"cache_dir": "/scratch"}, DisclosurePolicy(), "s1")
    assert (cfg.data.root, cfg.backbone.weights, cfg.cache_dir, notes) == ("/data", "/w.pth", "/scratch", [])


def test_site_owned_keys_round_trip_and_are_checked(tmp_path):
    path = tmp_path / "fuss_policy.json"
    path.write_text(json.dumps(HOSPITAL.to_dict()))
    assert DisclosurePolicy.load(path) == HOSPITAL and HOSPITAL.site_owned == disclosure.SITE_OWNED_KEYS
    with pytest.raises(ValueError, match="site_owned must be a list of configuration keys"):
        DisclosurePolicy.from_dict({"site_owned": "data.root"})
    with pytest.raises(Exception, match="data.rot"):  # a typo'd key is named when the site's policy is applied
        disclosure.site_config(FussConfig(), {}, DisclosurePolicy(site_owned=("data.rot",)), "s1")
