"""Label-free model selection: the criteria on hand-built tensors with known answers, the site's probe,
``Site.train``'s new metrics, the recorder's per-round means and selected model, and ``benchmarks.selection``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from benchmarks import selection as bench
from fuss_components import wire
from fuss_components.views import TrainFeatures
from fuss_components.config import FussConfig
from fuss_components.selection import (METRICS, SelectionProbe, agreement, balance, code_assignments, inertia,
                                       model_of, weighted_criteria)
from fuss_components.site import Site, build_model, init_global_state, resolve_partition
from fuss_components.trainer import LocalTrainer
from fuss_flare import CONFIG_FILE, ERROR_PROP, JOB_FAILED, SESSION_CLIENT_HEADER, SITE_CENSUS, SITE_ROLES_PROP
from fuss_flare.recorder import FussRecorder

TINY_BACKBONE = {"name": "fuss_tiny_vit_patch14", "weights": "random", "block": -1}  # 32 feature channels


def model_config(**loss) -> FussConfig:
    return FussConfig.from_dict({"backbone": TINY_BACKBONE, "data": {"dataset": "tiny", "train_size": 28},
                                 "train": {"dim": 8, "num_clusters": 3, "device": "cpu", "knn": 2, "num_random": 2},
                                 "loss": {"grid": 3, **loss}, "partition": "site"})


def identity_head_state(centroids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-channel model whose head returns its input features (linear part the identity, nonlinear part 0)."""
    state = {"head.linear.weight": torch.eye(2).view(2, 2, 1, 1), "head.linear.bias": torch.zeros(2),
             "head.nonlinear.0.weight": torch.zeros(2, 2, 1, 1), "head.nonlinear.0.bias": torch.zeros(2),
             "head.nonlinear.2.weight": torch.zeros(2, 2, 1, 1), "head.nonlinear.2.bias": torch.zeros(2)}
    state["centroids"] = centroids
    return state


# ---------------------------------------------------------------------------------------------- the criteria


def test_codes_on_their_centroids_have_inertia_one_and_the_known_assignment():
    model = model_of(identity_head_state(torch.eye(2) * 3.0), in_dim=2, dim=2, num_clusters=2)
    pattern = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])  # (views, h, w): the cluster of each position
    feats = torch.stack([torch.eye(2)[pattern[v]].permute(2, 0, 1) for v in range(2)]) * 5.0  # scale is no matter
    best, assignment = code_assignments(model, [feats[:1], feats[1:]])
    assert torch.equal(assignment, pattern)
    assert inertia(best) == pytest.approx(1.0, abs=1e-6) and inertia(best) <= 1.0
    assert balance(assignment, 2) == pytest.approx(1.0)  # four positions each


def test_inertia_is_the_mean_largest_cosine():
    model = model_of(identity_head_state(torch.eye(2)), in_dim=2, dim=2, num_clusters=2)
    angle = math.radians(30)
    feats = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]]).view(1, 2, 2, 1).permute(0, 2, 1, 3)
    best, assignment = code_assignments(model, [feats])  # positions: on centroid 0, 30 degrees from it
    assert assignment.flatten().tolist() == [0, 0]
    assert inertia(best) == pytest.approx((1 + math.cos(angle)) / 2, abs=1e-6)


def test_balance_is_the_normalised_entropy_of_cluster_usage():
    assert balance(torch.tensor([0, 1, 2, 3] * 5), 4) == pytest.approx(1.0)
    assert balance(torch.zeros(20, dtype=torch.long), 4) == 0.0
    assert balance(torch.tensor([0, 1] * 10), 4) == pytest.approx(0.5)  # two of four clusters: log 2 / log 4
    assert balance(torch.zeros(3, dtype=torch.long), 1) == 1.0


def test_agreement_is_the_share_of_positions_in_the_same_cluster():
    a = torch.tensor([[0, 1], [2, 0]])
    assert agreement(a, a.clone()) == 1.0
    assert agreement(a, torch.tensor([[0, 2], [2, 1]])) == 0.5
    assert agreement(a, (a + 1) % 3) == 1.0  # the same partition under other cluster ids (FedCC re-orders them)
    assert agreement(a, torch.tensor([[1, 0], [0, 1]])) == 0.75  # matched 0->1, 1->0, 2 ->0 is taken: 3 of 4
    with pytest.raises(ValueError, match="not of the same positions"):
        agreement(a, a.flatten())


def constant_trainer(cfg: FussConfig, views: int = 12) -> LocalTrainer:
    """A trainer whose views all hold one and the same feature vector at every position."""
    feats = torch.ones(views, 32, 4, 4).half()
    knn = torch.stack([torch.tensor([(i + 1) % views, (i + 2) % views]) for i in range(views)])
    return LocalTrainer(TrainFeatures(feats, [f"i{n // 5}" for n in range(views)], knn), cfg, "s1", 3)


def constant_code_state(cfg: FussConfig) -> dict[str, torch.Tensor]:
    """A head that outputs the same code everywhere, equal to centroid 1."""
    state = {k: torch.zeros_like(v) for k, v in init_global_state(cfg).items()}
    code = torch.arange(1.0, 9.0)
    state["head.linear.bias"] = code
    state["centroids"] = torch.stack([-code, code, torch.roll(code, 1)])
    return state


def test_correspondence_of_constant_codes_on_constant_features_is_the_shifted_loss():
    """Feature and code correlations are all 1, so each Eq. 6 term is shift - 1 (fixed shifts)."""
    cfg = model_config(shift_mode="fixed")
    lc = cfg.loss
    probe = SelectionProbe(constant_trainer(cfg), seed=3)
    values = probe.measure(constant_code_state(cfg), 0)
    expected = (lc.self_weight * (lc.self_shift - 1) + lc.knn_weight * (lc.knn_shift - 1)
                + lc.random_weight * (lc.random_shift - 1))
    assert values["correspondence"] == pytest.approx(expected, abs=1e-5)
    assert values["inertia"] == pytest.approx(1.0, abs=1e-6) and values["balance"] == 0.0
    assert "agreement" not in values  # nothing measured before


def test_probe_agreement_needs_the_previous_rounds_model_and_is_deterministic():
    cfg = model_config()
    torch.manual_seed(0)
    feats = torch.randn(20, 32, 4, 4).half()
    knn = torch.stack([torch.tensor([(i + 1) % 20, (i + 2) % 20]) for i in range(20)])
    trainer = LocalTrainer(TrainFeatures(feats, [f"i{n // 5}" for n in range(20)], knn), cfg, "s1", 3)
    state = init_global_state(cfg)
    probe = SelectionProbe(trainer, seed=7, max_views=8, queries=4)
    rng_before = torch.get_rng_state()
    first = probe.measure(state, 0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building the model draws nothing
    second = probe.measure(state, 1)
    assert second["agreement"] == 1.0  # the same model twice
    assert {k: v for k, v in second.items() if k != "agreement"} == first  # same positions, same draws
    assert "agreement" not in probe.measure(state, 3)  # the model of round 2 was not measured
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in state.items()}
    changed = probe.measure(other, 4)
    assert changed["agreement"] < 1.0 and changed["correspondence"] != first["correspondence"]
    again = SelectionProbe(LocalTrainer(trainer.feats, cfg, "s1", 3), seed=7, max_views=8, queries=4)
    assert again.measure(state, 0) == first
    assert len(probe.views) == 8 and len(set(probe.views.tolist())) == 8


def test_site_train_returns_the_criteria_of_the_received_model(tiny_cfg):
    site = Site(tiny_cfg, "s1", resolve_partition(tiny_cfg))
    state = init_global_state(tiny_cfg)
    first = site.train(state, 0)
    assert {"selection_inertia", "selection_balance", "selection_correspondence"} <= set(first.metrics)
    assert "selection_agreement" not in first.metrics
    second = site.train(first.state, 1)
    assert set(METRICS) <= set(second.metrics)
    # the criteria are those of the received model, not of the trained one
    assert second.metrics["selection_inertia"] == site.selection_probe.measure(first.state, 9)["inertia"]
    assert second.metrics["selection_inertia"] != site.selection_probe.measure(second.state, 10)["inertia"]
    kept, dropped = wire.check_metrics(second.metrics, wire.TRAIN_METRICS, wire.SiteBounds(num_clusters=3))
    assert dropped == [] and all(kept[m] == second.metrics[m] for m in METRICS)


def test_wire_holds_the_criteria_to_their_ranges():
    kept, dropped = wire.check_metrics({"selection_inertia": -1.5, "selection_balance": 1.2,
                                        "selection_agreement": 0.5, "selection_correspondence": float("inf")},
                                       wire.TRAIN_METRICS)
    assert kept == {"selection_agreement": 0.5}
    assert dict(dropped) == {"selection_inertia": "-1.5 is outside [-1, 1]",
                             "selection_balance": "1.2 is outside [0, 1]",
                             "selection_correspondence": "not a finite number"}


def test_weighted_criteria_weigh_by_declared_images_and_ignore_bad_values():
    sent = {"a": {"selection_inertia": 0.2, "selection_balance": 0.9, "loss_self": 1.0},
            "b": {"selection_inertia": 0.6, "selection_balance": 7.0},  # a balance out of range: not counted
            "validator": {"selection_inertia": 1.0},  # no declared training images
            "stranger": {"selection_inertia": -1.0}}  # not in the census
    means = weighted_criteria(sent, {"a": 1, "b": 3, "validator": 0})
    assert means == {"inertia": pytest.approx(0.5), "balance": pytest.approx(0.9)}


# ---------------------------------------------------------------------------------------------- the recorder


class Engine:
    """The server engine as far as ``FLComponent.fire_event`` uses it: records the events."""

    def __init__(self):
        self.events: list[str] = []

    def fire_event(self, event_type: str, fl_ctx: FLContext):
        self.events.append(event_type)


def recorder_context(tmp_path) -> FLContext:
    FussConfig.from_dict({"backbone": TINY_BACKBONE, "train": {"dim": 8, "num_clusters": 3}}).save(
        tmp_path / "config" / CONFIG_FILE)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, Engine(), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    return fl_ctx


def play_round(recorder: FussRecorder, fl_ctx: FLContext, round_idx: int, sent_model: dict, new_model: dict,
               results: dict[str, tuple[int, dict]]) -> None:
    """One round as ScatterAndGather fires it: start, each site's result, before aggregation, done."""
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_idx, private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(sent_model, {}), private=True, sticky=False)
    recorder.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    for name, (num_samples, metrics) in results.items():
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=False)
        fl_ctx.set_peer_context(peer)
        data = sent_model if num_samples else {}
        result = DXO(DataKind.WEIGHTS, data=data, meta={"num_samples": num_samples, "site": name,
                                                         MetaKey.INITIAL_METRICS: metrics}).to_shareable()
        fl_ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
        recorder.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, fl_ctx)
    recorder.handle_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(new_model, {}), private=True, sticky=False)
    recorder.handle_event(AppEventType.ROUND_DONE, fl_ctx)


def criteria(inertia: float, balance: float, correspondence: float, agreement: float | None = None) -> dict:
    out = {"selection_inertia": inertia, "selection_balance": balance, "selection_correspondence": correspondence,
           "loss_self": -0.1}
    if agreement is not None:
        out["selection_agreement"] = agreement
    return out


def validation(miou: float) -> dict:
    return {"miou": miou, "pixel_acc": 0.5, "per_class_iou": [miou], "num_images": 4.0}


def test_recorder_files_the_criteria_under_the_measured_models_round_and_keeps_the_selected_model(tmp_path):
    fl_ctx = recorder_context(tmp_path)
    recorder = FussRecorder(selection_criterion="correspondence")
    recorder.handle_event(EventType.START_RUN, fl_ctx)
    fl_ctx.set_prop(SITE_ROLES_PROP, {
        "site-1": {"is_training_site": True, "is_validation_site": False, "num_samples": 1},
        "site-2": {"is_training_site": True, "is_validation_site": False, "num_samples": 3},
        "val": {"is_training_site": False, "is_validation_site": True, "num_samples": 0}}, private=True,
        sticky=False)
    recorder.handle_event(SITE_CENSUS, fl_ctx)
    models = [{k: torch.full_like(v, float(i)) for k, v in build_model(model_config()).state_dict().items()}
              for i in range(4)]
    # round r: the sites send the criteria (and the validator the mIoU) of models[r], the model of round r - 1
    play_round(recorder, fl_ctx, 0, models[0], models[1], {
        "site-1": (1, criteria(0.1, 0.5, -0.1)), "site-2": (3, criteria(0.3, 0.9, -0.2)),
        "val": (0, validation(0.1))})
    play_round(recorder, fl_ctx, 1, models[1], models[2], {
        "site-1": (1, criteria(0.4, 0.8, -0.6, 0.7)), "site-2": (3, criteria(0.8, 0.4, -0.2, 0.9)),
        "val": (0, {**validation(0.3), **criteria(0.9, 0.9, -9.0)})})  # a validator's criteria weigh nothing
    play_round(recorder, fl_ctx, 2, models[2], models[3], {
        "site-1": (1, criteria(0.5, 0.5, -0.1, 5.0)), "site-2": (3, criteria(0.5, 0.5, -0.1, 0.8)),
        "val": (0, validation(0.2))})  # site-1's agreement is out of range: only site-2's counts

    history = json.loads((tmp_path / "metrics.json").read_text())
    initial, rounds = history["initial"], history["rounds"]
    assert initial["val_miou"] == pytest.approx(0.1)
    assert initial["selection"] == pytest.approx({"inertia": 0.25, "balance": 0.8, "correspondence": -0.175})
    assert rounds[0]["val_miou"] == pytest.approx(0.3)  # the same model: round 0's aggregate
    assert rounds[0]["selection"] == pytest.approx({"inertia": 0.7, "balance": 0.5, "agreement": 0.85,
                                                    "correspondence": -0.3})
    assert rounds[1]["val_miou"] == pytest.approx(0.2)
    assert rounds[1]["selection"] == pytest.approx({"inertia": 0.5, "balance": 0.5, "agreement": 0.8,
                                                    "correspondence": -0.1})
    assert "selection" not in rounds[2]  # the last model: no round measures it
    # lower correspondence is better: round 0's model (-0.3) beats round 1's (-0.1); the initial one never counts
    assert history["selected"] == {"criterion": "correspondence", "round": 0, "value": pytest.approx(-0.3),
                                   "global_model": str(tmp_path / "FL_selected_model.pt")}
    saved = torch.load(tmp_path / "FL_selected_model.pt", weights_only=True)
    assert saved.keys() == {"model"} and all(torch.equal(saved["model"][k], models[1][k]) for k in models[1])


def test_recorder_selection_is_off_by_default_and_names_its_criteria(tmp_path):
    assert FussRecorder().selection_criterion is None
    with pytest.raises(ValueError, match="inertia, balance, agreement, correspondence"):
        FussRecorder(selection_criterion="miou")


# ---------------------------------------------------------------------------------------------- the benchmark


def flare_metrics(pairs: list[tuple[float, float]]) -> dict:
    """A FLARE metrics.json whose rounds carry (inertia, val mIoU); the last round has no criteria."""
    rounds = [{"round": r, "val_miou": miou, "selection": {"inertia": value, "correspondence": -value}}
              for r, (value, miou) in enumerate(pairs)]
    rounds.append({"round": len(pairs), "val_miou": 0.9})
    return {"sites": {}, "initial": {"val_miou": 0.0, "selection": {"inertia": -1.0}}, "rounds": rounds}


def test_benchmark_pairs_each_model_with_its_own_miou_and_ranks_the_criteria(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(flare_metrics([(0.1, 0.2), (0.2, 0.3), (0.3, 0.25), (0.4, 0.5)])))
    (tmp_path / "b.json").write_text(json.dumps(flare_metrics([(0.5, 0.4), (0.6, 0.45), (0.7, 0.6)])))
    # an in-process run: round r + 1's train metrics measure round r's model
    runner = {"mode": "federated", "rounds": [
        {"round": 0, "miou": 0.3, "train": {"s1": {"selection_balance": 0.9}, "s2": {"selection_balance": 0.8}}},
        {"round": 1, "miou": 0.4, "train": {"s1": {"selection_balance": 0.5}, "s2": {"selection_balance": 0.7}}},
        {"round": 2, "miou": 0.2, "train": {"s1": {"selection_balance": 0.7}, "s2": {"selection_balance": 0.9}}}]}
    (tmp_path / "runner.json").write_text(json.dumps(runner))
    out = tmp_path / "selection.json"
    args = bench.get_args_parser().parse_args([str(tmp_path / n) for n in ("a.json", "b.json", "runner.json")]
                                              + ["--out", str(out)])
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    a, b, run = report["runs"]
    assert a["rounds"] == 4 and a["best"] == {"round": 3, "miou": 0.5}  # the criteria-less last round is left out
    assert a["criteria"]["inertia"]["rho"] == pytest.approx(0.8)  # ranks 1 2 3 4 against 1 3 2 4
    assert a["criteria"]["correspondence"]["rho"] == pytest.approx(0.8)  # lower is better: the same ranking
    assert a["criteria"]["inertia"]["selected_round"] == 3 and a["criteria"]["inertia"]["regret"] == 0.0
    assert run["kind"] == "runner" and run["rounds"] == 2
    assert [p["criteria"]["balance"] for p in bench.read_run(tmp_path / "runner.json")["pairs"]] == \
        pytest.approx([0.6, 0.8])  # round 0's model measured in round 1, round 1's in round 2
    assert run["criteria"]["balance"]["selected_round"] == 1 and run["criteria"]["balance"]["regret"] == 0.0
    pooled = report["pooled"]
    assert pooled["inertia"]["pairs"] == 7 and pooled["inertia"]["rho"] == pytest.approx(6 / 7)
    assert pooled["inertia"]["tracks"] and report["tracking"] == ["inertia", "correspondence"]
    assert pooled["balance"]["rho"] is None and not pooled["balance"]["tracks"]  # two pairs: undefined
    assert pooled["agreement"]["pairs"] == 0
    printed = capsys.readouterr().out
    assert "criteria that track mIoU: inertia, correspondence" in printed


def test_benchmark_refuses_a_run_without_rounds_naming_the_file(tmp_path):
    path = tmp_path / "local.json"
    path.write_text(json.dumps({"mode": "local", "sites": {}}))
    with pytest.raises(ValueError, match="local.json: neither"):
        bench.read_run(path)


# ---------------------------------------------------------------------------------------------- through FLARE


@pytest.mark.flare
def test_simulator_run_records_the_criteria_and_the_selected_model(tiny_data_root, tmp_path):
    """The tiny 2-round job (s1, s2 train, s3 validates) with ``selection_criterion`` set in the recorder's args:
    the sites' criteria pass their result filters and the recorder files and selects as in the unit test."""
    from conftest import tiny_config
    from test_flare_sim import export_job, simulate

    cfg = tiny_config(tiny_data_root, tmp_path / "cache", partition="site")
    job = export_job(cfg, tmp_path, "tiny_selection")
    server_cfg = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_cfg.read_text())
    next(c for c in server["components"] if c["id"] == "recorder")["args"]["selection_criterion"] = "inertia"
    server_cfg.write_text(json.dumps(server, indent=2))
    sim = simulate(job, tmp_path / "ws")
    assert sim.rc == 0, sim.log[-4000:]

    m = sim.metrics
    sent = {r: {s: m["rounds"][r]["train"][s]["metrics"] for s in ("s1", "s2")} for r in (0, 1)}
    assert all("selection_agreement" not in v for v in sent[0].values())  # round 0: the initial model, first seen
    assert all(set(METRICS) <= set(v) for v in sent[1].values())
    for model, r in ((m["initial"], 0), (m["rounds"][0], 1)):  # round r's criteria: the model validated in round r
        assert model["selection"]["inertia"] == pytest.approx(
            (6 * sent[r]["s1"]["selection_inertia"] + 5 * sent[r]["s2"]["selection_inertia"]) / 11)
    assert "selection" not in m["rounds"][1]
    assert m["selected"]["round"] == 0 and m["selected"]["criterion"] == "inertia"
    selected = torch.load(sim.app / "FL_selected_model.pt", weights_only=True)["model"]
    final = sim.global_state()
    assert set(selected) == set(final) and not all(torch.equal(selected[k], final[k]) for k in final)
    if m["best"]["round"] == 0:  # then the persistor's best file holds the same model: round 0's aggregate
        best = torch.load(sim.app / "FL_best_global_model.pt", weights_only=True)["model"]
        assert all(torch.equal(selected[k], best[k]) for k in best)


def test_communication_counts_rounds_and_uplink_bytes_until_95_percent_of_the_final_miou():
    from benchmarks.selection import communication

    history = {"rounds": [{"round": r, "val_miou": m, "train": {"a": {"bytes": 10}, "b": {"bytes": 5}}}
                          for r, m in enumerate([0.10, 0.195, 0.21, 0.20])]}
    assert communication(history) == {"share": 0.95, "final_miou": 0.20, "rounds": 2, "uplink_bytes": 30,
                                      "miou": 0.195}
    assert communication({"rounds": [{"round": 0}]}) is None


def test_recorder_keeps_a_round_that_did_not_finish_and_the_reason_the_job_failed(tmp_path):
    """Round 1 fails after one result arrived (FussAggregator raised, or an abort): at END_RUN the round is in
    metrics.json, marked incomplete, with what had arrived, filed under the client of the session that delivered
    it (not the identity the result claims); the failure's reason is recorded; the finished round 0 is untouched."""
    fl_ctx = recorder_context(tmp_path)
    recorder = FussRecorder()
    recorder.handle_event(EventType.START_RUN, fl_ctx)
    fl_ctx.set_prop(AppConstants.NUM_ROUNDS, 3, private=True, sticky=False)
    model = init_global_state(model_config())
    play_round(recorder, fl_ctx, 0, model, model, {"site-1": (2, criteria(0.1, 0.5, -0.1))})
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=False)
    recorder.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "site-9", private=False, sticky=False)  # what the client claims
    fl_ctx.set_peer_context(peer)
    result = DXO(DataKind.WEIGHTS, data=model, meta={"num_samples": 2, "site": "site-9",
                                                     MetaKey.INITIAL_METRICS: {"loss_self": 0.4}}).to_shareable()
    result.set_header(SESSION_CLIENT_HEADER, "site-1")  # as FussController stamps it
    fl_ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
    recorder.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, fl_ctx)
    fl_ctx.set_prop(ERROR_PROP, "round 1: 0 acceptable update(s)", private=True, sticky=False)
    recorder.handle_event(JOB_FAILED, fl_ctx)
    recorder.handle_event(EventType.END_RUN, fl_ctx)

    history = json.loads((tmp_path / "metrics.json").read_text())
    done, failed = history["rounds"]
    assert "incomplete" not in done and done["round"] == 0
    assert failed["round"] == 1 and failed["incomplete"] is True
    assert list(failed["train"]) == ["site-1"] and failed["train"]["site-1"]["num_samples"] == 2
    assert failed["accepted"] == [] and failed["rejected"] == []
    assert history["error"] == "round 1: 0 acceptable update(s)"
    assert history["final"] is None  # no final model was written
