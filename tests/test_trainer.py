"""LocalTrainer on the tiny synthetic dataset and tiny random backbone."""

import pytest
import torch

from fuss_components.head import FussModel
from fuss_components.trainer import _reseed_dead
from fuss_components.site import Site, init_global_state, resolve_partition


def _site(cfg, name="s1"):
    return Site(cfg, name, resolve_partition(cfg))


def _distance(a, b, prefix="head."):
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a if k.startswith(prefix)) ** 0.5


def test_train_is_deterministic_and_changes_the_model(tiny_cfg):
    state = init_global_state(tiny_cfg)
    first = _site(tiny_cfg).train(state, round_idx=0)
    second = _site(tiny_cfg).train(state, round_idx=0)
    for key in state:
        assert torch.equal(first.state[key], second.state[key]), key
    assert _distance(first.state, state) > 0
    assert not torch.equal(first.state["centroids"], state["centroids"])
    assert first.num_samples == 6  # images of s1, not views or batches
    assert {"loss_self", "loss_knn", "loss_random", "loss_centroids", "clusters_used"} <= set(first.metrics)
    other_round = _site(tiny_cfg).train(state, round_idx=1)
    assert not torch.equal(other_round.state["centroids"], first.state["centroids"])


def test_steps_per_round_from_local_epochs(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"federation.local_steps": None, "federation.local_epochs": 2.0})
    site = _site(cfg)
    # 6 images x 5 views = 30 views; 2 epochs of batches of 4 -> ceil(60 / 4) = 15 steps
    assert site.trainer.steps_per_round() == 15
    assert site.train(init_global_state(cfg), 0).metrics["steps"] == 15


@pytest.mark.parametrize("switch,kept", [("federation.average_head", "head."),
                                         ("federation.aggregate_centroids", "centroids")])
def test_e_and_c_switches_keep_local_state(tiny_cfg, switch, kept):
    state = init_global_state(tiny_cfg)
    # the server sends something else for exactly the switchable part
    other = {k: (v + 0.05 * torch.randn_like(v) if k.startswith(kept) else v) for k, v in state.items()}

    def second_round(cfg, global_state):
        site = _site(cfg)
        site.train(state, 0)  # round 0 sets the site's own previous model
        return site.train(global_state, 1).state

    off = tiny_cfg.with_overrides({switch: False})
    a, b = second_round(off, state), second_round(off, other)
    assert all(torch.equal(a[k], b[k]) for k in a)  # switched off: what the server sent there is ignored
    a, b = second_round(tiny_cfg, state), second_round(tiny_cfg, other)
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith(kept))  # control: on, it matters


def test_fedprox_keeps_head_near_global(tiny_cfg):
    state = init_global_state(tiny_cfg)
    free = _site(tiny_cfg).train(state, 0)
    prox_cfg = tiny_cfg.with_overrides({"train.fedprox_mu": 50.0})
    prox = _site(prox_cfg).train(state, 0)
    assert "loss_fedprox" in prox.metrics
    assert _distance(prox.state, state) < _distance(free.state, state)


def test_moon_term_from_second_round(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"train.moon_weight": 1.0})
    site = _site(cfg)
    state = init_global_state(cfg)
    assert "loss_moon" not in site.train(state, 0).metrics  # no previous local model yet
    metrics = site.train(state, 1).metrics
    assert metrics["loss_moon"] > 0


def test_dead_centroids_move_to_worst_explained_vectors():
    model = FussModel(in_dim=4, dim=2, num_clusters=3)
    optimizer = torch.optim.Adam([model.centroids])
    code = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [3.0, 0.1]]).T.reshape(1, 2, 2, 2)
    best = torch.tensor([0.9, 0.5, 0.1, 0.95]).reshape(1, 2, 2)  # positions 2, then 1, are worst explained
    before = model.centroids.detach().clone()
    moved = _reseed_dead(model, optimizer, torch.tensor([7, 0, 0]), code, best)
    assert moved == 2
    assert torch.equal(model.centroids[0], before[0])  # the used centroid stays
    assert torch.allclose(model.centroids[1:], torch.tensor([[0.0, 1.0], [0.6, 0.8]]))


def test_reseeding_switch(tiny_cfg):
    state = init_global_state(tiny_cfg)
    state["centroids"] = state["centroids"][:1].repeat(3, 1)  # identical centroids: argmax ties -> only #0 used
    off = _site(tiny_cfg.with_overrides({"train.reseed_dead_every": 0})).train(state, 0).metrics
    on = _site(tiny_cfg.with_overrides({"train.reseed_dead_every": 1})).train(state, 0).metrics
    assert off["clusters_reseeded"] == 0 and on["clusters_reseeded"] >= 2


def test_quantile_shifts_follow_attract_fractions(tiny_cfg):
    low = _site(tiny_cfg.with_overrides({"loss.self_attract": 0.1})).trainer.calibrate()
    high = _site(tiny_cfg.with_overrides({"loss.self_attract": 0.6})).trainer.calibrate()
    assert low.self > high.self  # fewer attracting pairs need a higher shift
    fixed = _site(tiny_cfg.with_overrides({"loss.shift_mode": "fixed"})).trainer.calibrate()
    assert (fixed.self, fixed.knn, fixed.random) == (0.4583, 0.1754, 0.3136)


def test_kmeans_centroids_are_a_fixed_point_of_cosine_kmeans_on_the_sites_codes(tiny_cfg, without_release):
    """train.centroids=kmeans: after the local steps the centroids are refit by cosine k-means of the site's own
    codes, started from the learned ones; the head is the one the loss trained (identical to "learned")."""
    state = init_global_state(tiny_cfg)
    learned = _site(tiny_cfg).train(state, 0).state
    cfg = tiny_cfg.with_overrides({"train.centroids": "kmeans", "train.centroid_refit_iters": 50})
    site = _site(cfg)
    refit = site.train(state, 0).state
    assert all(torch.equal(learned[k], refit[k]) for k in learned if k.startswith("head."))
    assert not torch.allclose(learned["centroids"], refit["centroids"])
    assert torch.allclose(refit["centroids"].norm(dim=1), torch.ones(len(refit["centroids"])))
    model = FussModel(site.trainer.in_dim, cfg.train.dim, site.num_clusters, 0.0).eval()
    model.load_state_dict(refit)
    with torch.no_grad():  # every view position has 16 codes here, all sampled: one more Lloyd step moves nothing
        views = site.trainer.feats.views(torch.arange(site.trainer.feats.num_views))
        codes = torch.nn.functional.normalize(model(views), dim=1)
    codes = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    assignment = (codes @ refit["centroids"].T).argmax(dim=1)
    for c in assignment.unique():
        mean = torch.nn.functional.normalize(codes[assignment == c].mean(0), dim=0)
        assert torch.allclose(mean, refit["centroids"][c], atol=1e-4)


def test_sampled_partner_codes_equal_the_full_map_computation():
    """The head on only the tokens the sampled points read (what training computes) gives the same codes at the
    points as the head on whole maps followed by grid_sample (what it computed before), and so the same loss."""
    from fuss_components.config import FussConfig
    from fuss_components.losses import (bilinear_corners, correspondence_term, gather_points, random_grid,
                                         sample_at)
    from fuss_components.trainer import LocalTrainer, Shifts
    from fuss_components.views import TrainFeatures

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 24, 6, 7, generator=gen)
    model = FussModel(24, 5, 3, dropout=0.0).eval()
    coords = random_grid(40, 4, gen)
    full = sample_at(model(feats), coords).flatten(2).transpose(1, 2)  # (40, 16, 5)
    index, weight = bilinear_corners(coords, 6, 7)
    index = index + (torch.arange(40) * 42)[:, None, None]
    read, inverse = torch.unique(index, return_inverse=True)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, 24)[read]
    assert len(read) < 40 * 42  # fewer tokens than the whole maps
    with torch.no_grad():
        sampled = gather_points(model.head.project(tokens), inverse, weight)
    torch.testing.assert_close(sampled, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gather_points(tokens, inverse, weight),
                               sample_at(feats, coords).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)

    # the whole stego loss: the step's terms against correspondence_term on full maps, same draws
    cfg = FussConfig().with_overrides({"train.dim": 5, "train.knn": 2, "train.num_random": 3, "loss.grid": 4,
                                       "train.precision": "float32",
                                       "train.batch_size": 4, "train.dropout": 0.0})
    knn = torch.stack([(torch.arange(40) + j) % 40 for j in (1, 2)], 1)
    trainer = LocalTrainer(TrainFeatures(feats.half(), [f"i{n // 5}" for n in range(40)], knn), cfg, "s", 3)
    trainer.shifts = Shifts(0.3, 0.2, 0.1)
    step = trainer_steps()["stego"](trainer)
    q = torch.tensor([0, 9, 17, 33])
    fq = trainer._batch(q)
    _, terms = step.head_loss(model, q, fq, model(fq), torch.Generator().manual_seed(5))
    draw = torch.Generator().manual_seed(5)
    pos, neg = step.partners(q, draw)
    cq_map = model(fq)
    coords_q, coords_p, coords_n = random_grid(4, 4, draw), random_grid(4, 4, draw), random_grid(12, 4, draw)
    fp, fn = trainer._batch(pos), trainer._batch(neg)
    sq, scq = sample_at(fq, coords_q), sample_at(cq_map, coords_q)
    expected = {
        "loss_self": correspondence_term(sq, sq, scq, scq, 0.3),
        "loss_knn": correspondence_term(sq, sample_at(fp, coords_p), scq, sample_at(model(fp), coords_p), 0.2),
        "loss_random": correspondence_term(sq.repeat_interleave(3, 0), sample_at(fn, coords_n),
                                           scq.repeat_interleave(3, 0), sample_at(model(fn), coords_n), 0.1),
    }
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-4, atol=1e-6, msg=key)


def trainer_steps():
    from fuss_components.trainer import OBJECTIVE_STEPS

    return OBJECTIVE_STEPS
