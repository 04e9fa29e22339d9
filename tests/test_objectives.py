"""The client objectives SmooSeg, PriMaPs-EM and PPAP: each loss on small cases computed by hand, the trainer with
every objective on the tiny synthetic dataset, the config key, and (marker `flare`) one FLARE simulator run per
objective: 2 training sites + 1 validation site, 2 rounds."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fuss_components.config import ConfigError, FussConfig, LossConfig, TrainConfig
from fuss_components.objectives import (IGNORE, class_confidence_weights, confidence_focal_loss, ema_update_,
                                        first_principal_direction, masks_to_pseudo_labels, principal_mask_proposals,
                                        propagate_proxy_anchors, proxy_anchor_contrastive_loss,
                                        proxy_anchor_partition, smoothness_term, soft_assignment, spherical_kmeans,
                                        student_prototype_loss)
from fuss_components.site import Site, init_global_state, resolve_partition

NEW_OBJECTIVES = ["smooseg", "primaps", "ppap"]
# conftest's tiny config shrinks two stego-only settings; the other objectives refuse changed stego settings
STEGO_DEFAULTS = {"loss.grid": LossConfig().grid, "train.num_random": TrainConfig().num_random}


@pytest.fixture
def tiny_cfg(tiny_data_root, tmp_path):
    """conftest's ``tiny_cfg`` with those stego-only settings at their defaults, so any objective can be set."""
    from conftest import tiny_config

    return tiny_config(tiny_data_root, tmp_path / "cache", **STEGO_DEFAULTS)


def _maps(*vectors):
    """(1, C, 1, n) map whose positions are the given vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# --------------------------------------------------------------------------------------------------- SmooSeg


def test_soft_assignment_by_hand():
    # cosines (1, 0) to the two prototypes, T = 0.1 -> softmax(10, 0)
    probs = soft_assignment(_maps((2.0, 0.0)), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), temperature=0.1)
    expected = 1 / (1 + math.exp(-10))
    assert probs.flatten().tolist() == pytest.approx([expected, 1 - expected], abs=1e-6)


def test_smoothness_term_by_hand():
    # image a: positions (1,0), (0,1); image b: (1,0), (1,0) -> closeness A = [[1, 1], [0, 0]]
    fa, fb = _maps((1, 0), (0, 1)), _maps((1, 0), (1, 0))
    # soft labels: a = (1,0), (0,1); b = (1,0), (1,0) -> disagreement 1 - cos = [[0, 0], [1, 1]]
    pa, pb = _maps((1, 0), (0, 1)), _maps((1, 0), (1, 0))
    # raw closeness, b = 0.25: (A - b) * disagreement = [[0, 0], [-0.25, -0.25]] -> mean -0.125 (a dissimilar pair
    # that disagrees lowers the loss)
    assert smoothness_term(fa, fb, pa, pb, 0.25, pointwise=False).item() == pytest.approx(-0.125)
    # pointwise centering: row means 1 and 0, global mean 0.5 -> W = 0.5 everywhere -> 0.25 * (0+0+1+1) / 4
    assert smoothness_term(fa, fb, pa, pb, 0.25, pointwise=True).item() == pytest.approx(0.125)
    # labels that agree everywhere cost nothing, whatever the closeness
    assert smoothness_term(fa, fb, pb, pb, 0.25, pointwise=False).item() == pytest.approx(0.0, abs=1e-7)


def test_smoothness_gradient_pulls_close_pairs_together():
    """A close pair (W > b) that disagrees: gradient descent on the code must raise its agreement."""
    feats = _maps((1, 0), (1, 0.1))  # W = [[1, .995], [.995, 1]] > b
    code = _maps((1, 0), (0, 1)).requires_grad_(True)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def loss_of(c):
        probs = soft_assignment(c, prototypes, 0.5)
        return smoothness_term(feats, feats, probs, probs, 0.5, pointwise=False)

    before = loss_of(code)
    before.backward()
    after = loss_of((code - 0.1 * code.grad).detach())
    assert after.item() < before.item()


def test_student_prototype_loss_by_hand():
    code = _maps((1, 0), (0, 1)).requires_grad_(True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # teacher labels: 0, 1
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    # student logits (cosines): position 0 (1, 0.7071) target 0; position 1 (0, 0.7071) target 1
    c = 1 / math.sqrt(2)
    expected = (math.log(1 + math.exp(c - 1)) + math.log(1 + math.exp(-c))) / 2
    loss = student_prototype_loss(code, student, teacher)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert student.grad is not None and code.grad is None and teacher.grad is None


def test_ema_update_values():
    teacher, student = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = ema_update_(teacher, student, 0.998)
    assert out is teacher  # in place
    assert teacher.tolist()[0] == pytest.approx([0.998, 0.002])
    ema_update_(teacher, student, 0.5)
    assert teacher.tolist()[0] == pytest.approx([0.499, 0.501])


# --------------------------------------------------------------------------------------------------- PriMaPs-EM


def _two_region_map() -> torch.Tensor:
    """(3, 2, 3) features: the first two columns (4 positions) near e1, the last column (2 positions) near e3."""
    rows = [[(1, 0.1, 0), (1, -0.1, 0), (0.1, 0, 1)],
            [(1, 0, 0.1), (1, 0, -0.1), (-0.1, 0, 1)]]
    return torch.tensor(rows, dtype=torch.float32).permute(2, 0, 1)


def test_first_principal_direction_points_to_the_larger_region():
    points = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])  # 3 points on e1, 1 on e2
    direction = first_principal_direction(points)
    # the component is (e1 - e2) / sqrt(2) up to sign; the e1 side holds 3 of the 4 points
    assert direction.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-5)


def test_principal_masks_separate_two_obvious_regions():
    masks = principal_mask_proposals(_two_region_map(), threshold=0.4, coverage=0.95)
    # the larger region is proposed first, the other second; together they cover everything
    assert masks.tolist() == [[0, 0, 1], [0, 0, 1]]
    # coverage 0.6 is reached by the first mask (4 of 6 positions): the rest stays unassigned
    masks = principal_mask_proposals(_two_region_map(), threshold=0.4, coverage=0.6)
    assert masks.tolist() == [[0, 0, IGNORE], [0, 0, IGNORE]]
    assert principal_mask_proposals(_two_region_map(), max_masks=1).tolist() == masks.tolist()
    # psi close to 1: the anchor's mask holds only what is almost identical to it, so more masks are needed
    fine = principal_mask_proposals(_two_region_map(), threshold=0.999, coverage=1.0)
    assert fine.max().item() >= 2 and (fine >= 0).all()


def test_masks_to_pseudo_labels_majority_vote_by_hand():
    masks = torch.tensor([[[0, 0, 1], [0, IGNORE, 1]], [[0, 0, 0], [0, 0, 0]]])
    predictions = torch.tensor([[[2, 2, 0], [1, 2, 1]], [[1, 1, 1], [1, 0, 1]]])
    labels = masks_to_pseudo_labels(masks, predictions, num_classes=3)
    # image 0: mask 0 votes (2, 2, 1) -> 2; mask 1 votes (0, 1), a tie -> 0; the uncovered position stays ignored
    # image 1: one mask voting 1 five times and 0 once -> 1 everywhere
    assert labels.tolist() == [[[2, 2, 0], [2, IGNORE, 0]], [[1, 1, 1], [1, 1, 1]]]


def test_confidence_focal_loss_by_hand():
    # two positions: logits (0, 0) -> p = (.5, .5), label 0; (ln 3, 0) -> p = (.75, .25), label 1
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    # mean confidence per class: (.5 + .75) / 2 = .625 and .375 -> weights (1 - .625)^2, (1 - .375)^2
    assert class_confidence_weights(logits.softmax(1), 2.0).tolist() == pytest.approx([0.375 ** 2, 0.625 ** 2])
    expected = (0.375 ** 2 * math.log(2) + 0.625 ** 2 * math.log(4)) / 2
    assert confidence_focal_loss(logits, labels, gamma=2.0).item() == pytest.approx(expected, abs=1e-6)
    # gamma 0: the plain cross-entropy mean
    assert confidence_focal_loss(logits, labels, gamma=0.0).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # an unlabelled position adds no loss term but counts in the class confidences: (.5+.75+.5)/3, (.5+.25+.5)/3
    logits3 = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)
    labels3 = torch.tensor([[[0, 1, IGNORE]]])
    w0, w1 = (1 - 1.75 / 3) ** 2, (1 - 1.25 / 3) ** 2
    expected3 = (w0 * math.log(2) + w1 * math.log(4)) / 2
    assert confidence_focal_loss(logits3, labels3, gamma=2.0).item() == pytest.approx(expected3, abs=1e-6)
    # nothing labelled: zero, and still differentiable
    empty = torch.zeros(1, 2, 1, 2, requires_grad=True)
    loss = confidence_focal_loss(empty, torch.full((1, 1, 2), IGNORE), 2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(empty.grad, torch.zeros_like(empty))


def test_spherical_kmeans_by_hand():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    start = torch.tensor([[1.0, 0.2], [0.2, 1.0], [-1.0, -1.0]])  # the third centre never wins a point
    centres = spherical_kmeans(points, start, iterations=3)
    unit = F.normalize(points, dim=1)
    expected = torch.stack([F.normalize(unit[0] + unit[1], dim=0), F.normalize(unit[2] + unit[3], dim=0),
                            F.normalize(torch.tensor([-1.0, -1.0]), dim=0)])
    assert torch.allclose(centres, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------- PPAP


def _fan() -> torch.Tensor:
    """Four unit patches at 0, 20, 60 and 90 degrees."""
    return torch.tensor([_unit(0), _unit(20), _unit(60), _unit(90)])


def test_proxy_anchor_propagation_by_hand():
    feats = _fan()
    # the anchor at 0 degrees: positives cos > 0.6 are 0 and 20 degrees -> the proxy moves to 10 degrees
    proxy, phi, psi = propagate_proxy_anchors(feats[:1], feats, 0.6, 0.2, steps=1, sigma_positive=3.0,
                                              sigma_ambiguity=3.0)
    moved = 1 - math.cos(math.radians(10))
    assert proxy[0].tolist() == pytest.approx(_unit(10), abs=1e-6)
    assert phi.item() == pytest.approx(0.6 - moved / 3, abs=1e-6)
    assert psi.item() == pytest.approx(0.2 + moved / 3, abs=1e-6)
    # no step: the proxy is the anchor and the boundaries are the initial ones
    proxy, phi, psi = propagate_proxy_anchors(feats[:1], feats, 0.6, 0.2, 0, 3.0, 3.0)
    assert proxy[0].tolist() == pytest.approx(_unit(0), abs=1e-6)
    assert (phi.item(), psi.item()) == pytest.approx((0.6, 0.2))


def test_proxy_anchor_partition_by_hand():
    feats, anchor = _fan(), torch.tensor([0])
    # no propagation: 20 deg (cos .94) positive, 60 deg (cos .5) in the ambiguity zone [.2, .6], 90 deg negative
    positive, negative = proxy_anchor_partition(feats[anchor], feats, anchor, 0.6, 0.2, 0, 3.0, 3.0)
    assert positive.tolist() == [[False, True, False, False]]  # never the anchor itself
    assert negative.tolist() == [[False, False, False, True]]
    # one propagation step: the proxy at 10 deg sees 60 deg at cos 50 = .643 > phi = .595: now a positive;
    # 90 deg at cos 80 = .174 < psi = .205 stays negative
    positive, negative = proxy_anchor_partition(feats[anchor], feats, anchor, 0.6, 0.2, 1, 3.0, 3.0)
    assert positive.tolist() == [[False, True, True, False]]
    assert negative.tolist() == [[False, False, False, True]]


def test_ambiguity_zone_exclusion_changes_the_loss_by_hand():
    feats, anchor = _fan(), torch.tensor([0])
    codes = feats.clone()  # codes = features, T = 1: the logits are the cosines
    c20 = math.cos(math.radians(20))
    # with the zone: contrast set = {20 deg (positive), 90 deg (negative)} -> -log(e^c20 / (e^c20 + e^0))
    positive, negative = proxy_anchor_partition(feats[anchor], feats, anchor, 0.6, 0.2, 0, 3.0, 3.0)
    with_zone = proxy_anchor_contrastive_loss(codes[anchor], codes, positive, negative, 1.0)
    assert with_zone.item() == pytest.approx(math.log(1 + math.exp(-c20)), abs=1e-6)
    # without it (edge = boundary): 60 deg becomes a negative -> -log(e^c20 / (e^c20 + e^0.5 + e^0))
    positive, negative = proxy_anchor_partition(feats[anchor], feats, anchor, 0.6, 0.6, 0, 3.0, 3.0)
    assert negative.tolist() == [[False, False, True, True]]
    without_zone = proxy_anchor_contrastive_loss(codes[anchor], codes, positive, negative, 1.0)
    assert without_zone.item() == pytest.approx(math.log(1 + math.exp(0.5 - c20) + math.exp(-c20)), abs=1e-6)
    assert without_zone.item() > with_zone.item()


def test_contrastive_loss_averages_anchors_with_positives_and_survives_none():
    codes = torch.tensor([_unit(0), _unit(30), _unit(90)], requires_grad=True)
    positive = torch.tensor([[False, True, False], [False, False, False]])  # the second anchor has no positive
    negative = torch.tensor([[False, False, True], [True, False, False]])
    loss = proxy_anchor_contrastive_loss(codes[[0, 1]], codes, positive, negative, 0.5)
    c30 = math.cos(math.radians(30)) / 0.5
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-c30)), abs=1e-6)  # anchor 0 only
    none = proxy_anchor_contrastive_loss(codes[[0, 1]], codes, positive & False, negative, 0.5)
    none.backward()
    assert none.item() == 0.0 and torch.equal(codes.grad, torch.zeros_like(codes))


# --------------------------------------------------------------------------------------------------- config


def test_objective_key_defaults_and_validation():
    cfg = FussConfig()
    assert cfg.train.objective == "stego"
    assert (cfg.train.smooseg.teacher_ema, cfg.train.smooseg.temperature) == (0.998, 0.1)
    assert (cfg.train.smooseg.lr_head, cfg.train.smooseg.lr_prototypes) == (1e-4, 5e-4)
    assert (cfg.train.smooseg.within_shift, cfg.train.smooseg.cross_shift) == (-0.02, 0.5)
    assert (cfg.train.primaps.threshold, cfg.train.primaps.focal_gamma, cfg.train.primaps.ema_decay) == (0.4, 2.0, 0.98)
    assert (cfg.train.ppap.positive_threshold, cfg.train.ppap.ambiguity_threshold) == (0.6, 0.2)
    with pytest.raises(ConfigError, match="train.objective"):
        FussConfig.from_dict({"train": {"objective": "hp"}})
    with pytest.raises(ConfigError, match="train.smooseg.teacher_ema"):
        cfg.with_overrides({"train.smooseg.teacher_ema": 1.0})
    with pytest.raises(ConfigError, match="train.ppap.ambiguity_threshold"):
        cfg.with_overrides({"train.ppap.ambiguity_threshold": 0.7})
    with pytest.raises(ConfigError, match="train.primaps.nope"):
        FussConfig.from_dict({"train": {"primaps": {"nope": 1}}})
    assert cfg.with_overrides({"train.objective": "ppap", "train.ppap.temperature": 0.5}).train.ppap.temperature == 0.5


def test_job_export_objective_flag(tiny_cfg, tmp_path):
    from fuss_flare.job import main

    cfg_file = tmp_path / "cfg.json"
    tiny_cfg.save(cfg_file)
    assert main(["export", "--config", str(cfg_file), "--out", str(tmp_path / "jobs"), "--name", "j",
                 "--objective", "primaps"]) == 0
    shipped = json.loads((tmp_path / "jobs" / "j" / "app" / "config" / "fuss_config.json").read_text())
    assert shipped["train"]["objective"] == "primaps"


# --------------------------------------------------------------------------------------------------- trainer


EXPECTED_TERMS = {
    "smooseg": {"loss_smooth_within", "loss_smooth_cross", "loss_prototypes"},
    "primaps": {"loss_focal", "pseudo_labelled"},
    "ppap": {"loss_ppap", "ppap_positives", "ppap_negatives", "loss_centroids"},
}


def _site(cfg, name="s1"):
    return Site(cfg, name, resolve_partition(cfg))


@pytest.mark.parametrize("objective", NEW_OBJECTIVES)
def test_trainer_runs_each_objective(tiny_cfg, objective):
    cfg = tiny_cfg.with_overrides({"train.objective": objective, "federation.local_steps": 4,
                                   "train.primaps.ema_every": 2})
    stego_state = init_global_state(tiny_cfg)
    state = init_global_state(cfg)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in stego_state.items()}

    first = _site(cfg).train(state, round_idx=0)
    again = _site(cfg).train(state, round_idx=0)  # a fresh site, same seed: the same numbers
    assert {k: v.shape for k, v in first.state.items()} == {k: v.shape for k, v in stego_state.items()}
    for key in state:
        assert torch.equal(first.state[key], again.state[key]), key
        assert torch.isfinite(first.state[key]).all(), key
    assert {k: v for k, v in first.metrics.items() if k != "seconds"} == \
           {k: v for k, v in again.metrics.items() if k != "seconds"}
    assert EXPECTED_TERMS[objective] <= set(first.metrics)
    assert "loss_self" not in first.metrics  # the stego terms are not computed
    assert all(math.isfinite(v) for v in first.metrics.values())
    assert sum(((first.state[k] - state[k]) ** 2).sum().item() for k in state if k.startswith("head.")) > 0
    assert not torch.equal(first.state["centroids"], state["centroids"])
    assert 1 <= first.metrics["clusters_used"] <= 3

    other_seed = _site(cfg.with_overrides({"train.seed": 1})).train(state, 0)
    assert not torch.equal(other_seed.state["head.linear.weight"], first.state["head.linear.weight"])
    second_round = _site(cfg).train(first.state, round_idx=1)
    assert not torch.equal(second_round.state["centroids"], first.state["centroids"])


@pytest.mark.parametrize("objective", NEW_OBJECTIVES)
def test_fedprox_and_moon_combine_with_each_objective(tiny_cfg, objective):
    cfg = tiny_cfg.with_overrides({"train.objective": objective, "train.fedprox_mu": 0.5, "train.moon_weight": 1.0})
    site = _site(cfg)
    first = site.train(init_global_state(cfg), 0)
    second = site.train(first.state, 1)  # MOON needs the previous local model
    assert {"loss_fedprox", "loss_moon"} <= set(second.metrics) and "loss_fedprox" in first.metrics
    assert all(math.isfinite(v) for v in second.metrics.values())


def test_primaps_momentum_prototypes_move_only_by_ema(tiny_cfg, without_release):
    cfg = tiny_cfg.with_overrides({"train.objective": "primaps", "federation.local_steps": 3,
                                   "train.primaps.ema_every": 100})  # no EMA update within the round
    state = init_global_state(cfg)
    site = _site(cfg)
    # round 0: the only change to the travelling centroids is the k-means initialisation (unit rows)
    r0 = site.train(state, 0)
    assert not torch.equal(r0.state["centroids"], state["centroids"])
    assert torch.allclose(r0.state["centroids"].norm(dim=1), torch.ones(3), atol=1e-5)
    # round 1: no k-means, no EMA -> the centroids sent back are the ones received
    r1 = site.train(r0.state, 1)
    assert torch.equal(r1.state["centroids"], r0.state["centroids"])
    # the mask proposals are cached per view: (h, w) maps of mask ids (or IGNORE) for every view trained on
    h, w = site.trainer.feats.geometry[1:]
    assert site.trainer.mask_proposals and all(m.shape == (h, w) for m in site.trainer.mask_proposals.values())
    no_init = _site(cfg.with_overrides({"train.primaps.kmeans_iters": 0})).train(state, 0)
    assert torch.equal(no_init.state["centroids"], state["centroids"])


def test_smooseg_teacher_moves_slowly(tiny_cfg, without_release):
    """The travelling centroids are the teacher: with EMA 0.998 over 4 steps it moves at most 1 - 0.998^4 of
    the way to wherever the student went; with EMA 0 it is the student itself and moves much further."""
    state = init_global_state(tiny_cfg)

    def moved(ema):
        cfg = tiny_cfg.with_overrides({"train.objective": "smooseg", "federation.local_steps": 4,
                                       "train.smooseg.teacher_ema": ema, "train.smooseg.lr_prototypes": 0.05})
        return (_site(cfg).train(state, 0).state["centroids"] - state["centroids"]).norm().item()

    slow, fast = moved(0.998), moved(0.0)
    assert 0 < slow < 0.02 * fast


# --------------------------------------------------------------------------------------------------- FLARE


@pytest.mark.flare
@pytest.mark.parametrize("objective", NEW_OBJECTIVES)
def test_simulator_runs_each_objective(objective, tiny_data_root, tmp_path):
    """2 training sites x 2 rounds (+ the validation site) through `nvflare simulator`: the job completes and the
    global model has exactly the keys and shapes of a stego model."""
    from test_flare_sim import MODEL_KEYS, export_job, simulate

    cfg = tiny_config_for(objective, tiny_data_root, tmp_path / "cache")
    job = export_job(cfg, tmp_path, f"tiny_{objective}")
    sim = simulate(job, tmp_path / "ws")
    print(f"\nsimulator wall seconds ({objective}): {sim.seconds:.1f}")
    assert sim.rc == 0, sim.log[-4000:]
    stego = init_global_state(tiny_config_for("stego", tiny_data_root, tmp_path / "cache"))
    state = sim.global_state()
    assert set(state) == MODEL_KEYS == set(stego)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in stego.items()}
    assert all(torch.isfinite(v).all() for v in state.values())
    final = torch.load(sim.app / "fuss_model.pt", weights_only=True)
    assert final["config"]["train"]["objective"] == objective and final["rounds"] == 2
    m = sim.metrics
    assert [r["round"] for r in m["rounds"]] == [0, 1] and "error" not in m
    for rec in m["rounds"]:
        assert rec["accepted"] == ["s1", "s2"] and rec["rejected"] == []
        for name in ("s1", "s2"):  # s3 validates only: a zero-weight result without parameters
            assert set(rec["train"][name]["param_keys"]) == MODEL_KEYS
            assert EXPECTED_TERMS[objective] <= set(rec["train"][name]["metrics"])
        assert rec["train"]["s3"]["param_keys"] == []
        assert 0.0 <= rec["validation"]["s3"]["miou"] <= 1.0


def tiny_config_for(objective, data_root, cache_dir):
    from conftest import tiny_config

    return tiny_config(data_root, cache_dir, **{"partition": "site", "train.objective": objective, **STEGO_DEFAULTS})
