"""`python -m benchmarks.paper`: the settings of the paper's tables, the tables and records it writes, and one end-to-end run
through the real FLARE simulator on the tiny synthetic dataset (run twice: same numbers)."""

from __future__ import annotations

import json
import statistics

import pytest

from fuss_components.config import ConfigError
from benchmarks.paper import (
    BUDGETS,
    base_config,
    DATASETS,
    FEDPROX_MU,
    bench_paper,
    claim_differences,
    compare_runs,
    flat_records,
    get_args_parser,
    markdown_tables,
    merge_checks,
    paper_settings,
    result_stem,
    verify_paper,
    with_current_names,
)
from fuss_components.presets import PRESETS


def test_settings_cover_the_papers_tables():
    rows = {s.name: s for s in paper_settings()}
    main = [n for n, s in rows.items() if s.table == "main"]
    assert main == ["raw-kmeans", "local-only", "centralized", "FedAvg", "FedAvg+FedCC", "FedProx", "FedProx+FedCC",
                    "FedMoon", "FedMoon+FedCC", "FedAvg+FedCC-maximin"]
    assert rows["FedProx+FedCC"].overrides()["train.fedprox_mu"] == FEDPROX_MU
    assert rows["FedProx+FedCC"].overrides()["federation.aggregator"] == "fedcc-kmeans"
    assert rows["FedMoon"].overrides()["train.moon_weight"] == 1.0 and "train.fedprox_mu" not in rows["FedMoon"].overrides()
    assert rows["FedAvg+FedCC-maximin"].overrides()["federation.aggregator"] == "fedcc-maximin"
    ablation = {n: s for n, s in rows.items() if s.table == "ablation"}
    assert len(ablation) == 6
    for name, s in ablation.items():
        flags = (s.weighted, s.average_head, s.aggregate_centroids)
        assert flags.count(False) == 1 and s.wec in name  # the label says which switch is off
        o = s.overrides()
        assert (o["federation.weighted"], o["federation.average_head"], o["federation.aggregate_centroids"]) == flags
    assert BUDGETS["full"]["rounds"] == 10 and BUDGETS["full"]["local_steps"] is None  # one epoch per round


def _run(setting, seed, miou, crf_miou, **extra):
    return {"setting": setting, "seed": seed, "table": "main", "dataset": "camvid", "kind": "flare",
            "eval": {"miou": miou, "pixel_acc": 0.5, "crf_miou": crf_miou, "crf_pixel_acc": 0.6}, "rounds": 3,
            "local_steps": 15, "crf_every": 4, "commit": "abc", **extra}


def test_tables_and_records_hold_mean_and_spread_over_seeds():
    runs = [_run("FedAvg", 0, 0.20, 0.22), _run("FedAvg", 1, 0.24, 0.25), _run("FedAvg+FedCC", 0, 0.30, 0.31)]
    text = markdown_tables(runs, "camvid", "reduced")
    std = statistics.stdev([20.0, 24.0])
    assert f"| FedAvg | 22.00 ± {std:.2f} | 50.00 ± 0.00 | 23.50 ± {statistics.stdev([22.0, 25.0]):.2f} |" in text
    assert "| FedAvg+FedCC | 30.00 | 50.00 | 31.00 | 60.00 | 1 |" in text
    assert "saliency" in text  # the backbone caveat travels with every table
    assert "Table 3" not in text  # no ablation runs, no empty ablation table
    assert "(3 rounds x 15 local steps; CRF on every 4th validation image)" in text
    full = markdown_tables([_run("FedAvg", 0, 0.2, 0.2) | {"local_steps": "1.0 epoch(s)", "crf_every": 1}], "camvid",
                           "full")
    assert "(3 rounds x 1.0 epoch(s) of local training; CRF on every validation image)" in full
    # FedAvg+FedCC - FedAvg on the one shared seed: 30 - 20 = +10 points (CRF 31 - 22 = +9)
    assert "| FedCC beats FedAvg (FedAvg+FedCC - FedAvg) | +10.00 | +9.00 | 1 / 1 of 1 |" in text
    records = flat_records(runs)
    assert len(records) == 6
    fedavg0 = [r for r in records if r["setting"] == "FedAvg" and r["seed"] == 0]
    assert {(r["crf"], r["miou"]) for r in fedavg0} == {(False, 0.20), (True, 0.22)}
    assert all(set(r) >= {"dataset", "strategy", "aggregator", "regulariser", "wec", "seed", "crf", "miou", "pixel_acc",
                          "rounds", "local_steps", "commit"} for r in records)


def test_records_of_older_commits_read_with_todays_names(tmp_path):
    """Recorded files of older commits name pixel accuracy ``acc`` / ``crf_acc``: tables, records and --verify read
    them as ``pixel_acc`` / ``crf_pixel_acc``, and the recorded file is left as it is."""
    old = _run("FedAvg", 0, 0.20, 0.22) | {"sites": {"s1": {"miou": 0.2, "acc": 0.4}}}
    old["eval"] = {"miou": 0.20, "acc": 0.5, "crf_miou": 0.22, "crf_acc": 0.6}
    current = with_current_names(old)
    assert current["eval"] == _run("FedAvg", 0, 0.20, 0.22)["eval"] and current["sites"]["s1"]["pixel_acc"] == 0.4
    assert "acc" in old["eval"]  # the record read is not changed
    assert markdown_tables([current], "camvid", "reduced") == markdown_tables([_run("FedAvg", 0, 0.20, 0.22)],
                                                                              "camvid", "reduced")
    assert compare_runs(current, _run("FedAvg", 0, 0.20, 0.22))["same"]


def test_command_line_keeps_the_old_arguments():
    args = get_args_parser().parse_args(["--dataset", "polyp", "--budget", "reduced", "--seeds", "0", "--verify",
                                         "--only", "FedAvg", "FedAvg+FedCC", "--tag", "ppap", "--tolerance", "1e-4",
                                         "--set", "train.objective=ppap", "--set", "federation.rounds=2"])
    assert (args.dataset, args.budget, args.seeds, args.verify, args.only, args.tag, args.tolerance) == \
        ("polyp", "reduced", [0], True, ["FedAvg", "FedAvg+FedCC"], "ppap", 1e-4)
    assert args.set == ["train.objective=ppap", "federation.rounds=2"]
    assert (args.out, args.figures, args.work) == ("docs/results", "docs/figures", "runs/bench_paper")
    assert set(DATASETS) <= set(PRESETS)  # the datasets come from the library's one preset table


def test_claims_are_paired_by_seed():
    runs = [_run("FedAvg", 0, 0.20, 0.22), _run("FedAvg", 1, 0.24, 0.25), _run("FedAvg", 2, 0.30, 0.30),
            _run("local-only", 0, 0.18, 0.23), _run("local-only", 1, 0.25, 0.20)]
    (claim,) = [c for c in claim_differences(runs) if c["reference"] == "local-only" and c["better"] == "FedAvg"]
    assert claim["seeds"] == [0, 1] and claim["diffs"] == pytest.approx([2.0, -1.0])  # seed 2 has no partner
    assert claim["mean"] == pytest.approx(0.5) and claim["std"] == pytest.approx(statistics.stdev([2.0, -1.0]))
    assert claim["positive"] == 1
    crf = [c for c in claim_differences(runs, "crf_miou") if c["better"] == "FedAvg"][0]
    assert crf["diffs"] == pytest.approx([-1.0, 5.0]) and crf["positive"] == 1
    assert not [c for c in claim_differences(runs) if c["better"] == "FedAvg+FedCC"]  # no such runs


def test_ablation_claims_compare_the_full_setting_with_the_switch_off():
    runs = [_run("FedAvg+FedCC", 0, 0.21, 0.22), _run("FedAvg+FedCC [WE-]", 0, 0.25, 0.20)]
    (claim,) = claim_differences(runs)
    assert claim["claim"] == "C (aggregated centroids) helps FedAvg+FedCC"
    assert claim["better"] == "FedAvg+FedCC" and claim["diffs"] == pytest.approx([-4.0])  # 21 - 25: C off was better
    assert claim["positive"] == 0


def test_verify_comparison_names_every_difference():
    recorded = _run("FedAvg", 0, 0.20, 0.22, curve=[0.1, 0.2])
    assert compare_runs(recorded, _run("FedAvg", 0, 0.20, 0.22, curve=[0.1, 0.2], commit="def")) == \
        compare_runs(recorded, recorded) | {"rerun_commit": "def"}
    moved = compare_runs(recorded, _run("FedAvg", 0, 0.20, 0.2215, curve=[0.1, 0.2]))
    assert not moved["same"] and moved["max_abs_diff"] == pytest.approx(0.0015)
    assert moved["abs_diff"]["crf_miou"] == pytest.approx(0.0015) and moved["abs_diff"]["miou"] == 0.0
    assert compare_runs(recorded, _run("FedAvg", 0, 0.20, 0.2215, curve=[0.1, 0.2]), tolerance=0.002)["same"]
    other_curve = compare_runs(recorded, _run("FedAvg", 0, 0.20, 0.22, curve=[0.1, 0.25]))
    assert not other_curve["same"] and other_curve["abs_diff"]["curve"] == pytest.approx(0.05)
    assert compare_runs(recorded, _run("FedAvg", 0, 0.20, 0.22, curve=[0.1]))["max_abs_diff"] == float("inf")


def test_each_budget_and_variant_has_its_own_files():
    stems = {result_stem(d, b, t) for d in ("camvid", "polyp") for b in BUDGETS for t in ("", "ppap")}
    assert len(stems) == 2 * len(BUDGETS) * 2
    assert result_stem("camvid", "full") == "camvid_full" and result_stem("camvid", "reduced", "ppap") == \
        "camvid_ppap_reduced"


def test_verify_file_accumulates_checks_of_other_pairs():
    old = {"tolerance": 0.0, "checks": [{"setting": "FedAvg", "seed": 0, "same": True},
                                         {"setting": "FedAvg", "seed": 1, "same": False}]}
    rerun = [{"setting": "FedAvg", "seed": 1, "same": True, "tolerance": 0.01}]
    merged = merge_checks(old, rerun)
    # seed 0 kept (with the tolerance it was checked at), seed 1 replaced by the new check
    assert merged == [{"setting": "FedAvg", "seed": 0, "same": True, "tolerance": 0.0}] + rerun
    assert merge_checks(None, rerun) == rerun


def test_verify_needs_recorded_runs(tmp_path):
    with pytest.raises(ConfigError, match="nothing recorded"):
        verify_paper("camvid", tmp_path, tmp_path / "work", [0], "reduced")
    (tmp_path / "paper_camvid_reduced.json").write_text(json.dumps({"runs": [
        _run("FedAvg", 0, 0.2, 0.2, budget="reduced", overrides={})]}))
    with pytest.raises(ConfigError, match="none of the selected"):
        verify_paper("camvid", tmp_path, tmp_path / "work", [1], "reduced")
    assert not (tmp_path / "work").exists()


def test_unknown_setting_or_budget_fails_before_work(tmp_path):
    with pytest.raises(ConfigError, match="FedAvgg"):
        bench_paper("camvid", tmp_path / "out", tmp_path / "work", [0], "reduced", only=["FedAvgg"])
    with pytest.raises(ConfigError, match="budget"):
        bench_paper("camvid", tmp_path / "out", tmp_path / "work", [0], "huge")
    assert not (tmp_path / "work").exists()


def _tiny_overrides(data_root, cache):
    return {"backbone.name": "fuss_tiny_vit_patch14", "backbone.weights": "random", "backbone.block": -1,
            "data.dataset": "tiny", "data.root": str(data_root), "data.train_size": 28, "data.eval_short_side": 42,
            "train.dim": 8, "train.batch_size": 4, "train.num_clusters": 3, "train.knn": 2, "train.num_random": 2,
            "loss.grid": 3, "federation.rounds": 2, "federation.local_steps": 3, "partition": "site",
            "cache_dir": str(cache)}


@pytest.mark.flare
def test_bench_paper_end_to_end_is_reproducible(tiny_data_root, tmp_path):
    from benchmarks.paper import figures

    only = ["raw-kmeans", "local-only", "FedAvg", "FedAvg+FedCC"]
    overrides = _tiny_overrides(tiny_data_root, tmp_path / "cache")
    first = bench_paper("camvid", tmp_path / "a", tmp_path / "wa", [0], "reduced", only, overrides, overlays=1)
    # --verify: the recorded settings again in fresh folders (a second simulator run; the feature cache is
    # shared) give the same numbers, and the comparison is written beside the records
    checks = verify_paper("camvid", tmp_path / "a", tmp_path / "wb", [0], "reduced", ["local-only", "FedAvg+FedCC"],
                          overrides)
    assert [(c["setting"], c["same"], c["max_abs_diff"]) for c in checks] == \
           [("local-only", True, 0.0), ("FedAvg+FedCC", True, 0.0)]
    recorded = {(r["setting"], r["crf"]): r["miou"] for r in first}
    assert all(c["rerun"]["crf_miou"] == recorded[(c["setting"], True)] for c in checks)
    assert json.loads((tmp_path / "a" / "paper_tiny_reduced_verify.json").read_text())["checks"] == checks
    assert {r["setting"] for r in first} == set(only) and len(first) == 2 * len(only)
    assert all(0 <= r["miou"] <= 1 for r in first)

    runs = {r["setting"]: r for r in json.loads((tmp_path / "a" / "paper_tiny_reduced.json").read_text())["runs"]}
    fedavg = runs["FedAvg"]
    # our evaluation of the downloaded global model = the validation the FLARE job ran on its last round
    assert fedavg["eval"]["miou"] == pytest.approx(fedavg["curve"][-1], abs=1e-9)
    assert len(fedavg["curve"]) == 2 and fedavg["bytes_per_client_round"] > 0
    assert runs["local-only"]["eval"]["miou_worst"] <= runs["local-only"]["eval"]["miou"] \
        <= runs["local-only"]["eval"]["miou_best"]
    assert "| FedAvg+FedCC |" in (tmp_path / "a" / "paper_tiny_reduced.md").read_text()
    assert "#### Centroid drift per round" in (tmp_path / "a" / "paper_tiny_reduced.md").read_text()

    # a re-run into the same folder keeps the finished runs (no simulator started: it returns at once)
    again = bench_paper("camvid", tmp_path / "a", tmp_path / "wa", [0], "reduced", only, overrides)
    assert again == first
    pngs = figures(tmp_path / "a" / "paper_tiny_reduced.json", tmp_path / "fig")
    assert {p.name for p in pngs} == {"tiny_miou_per_round.png", "tiny_centroid_drift.png", "tiny_centroids_pca.png",
                                      "tiny_centroid_cosine.png"}  # the FLARE runs recorded their drift
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_partition_tag_and_config_of_a_skewed_preset():
    from benchmarks.paper import partition_tag

    assert partition_tag("camvid", None) == "" and partition_tag("camvid", "camvid") == ""
    assert partition_tag("camvid", "camvid-dir0.1:6") == "dir0.1-6clients"
    assert partition_tag("polyp", "polyp-missing") == "missing"
    cfg = base_config("camvid", BUDGETS["full"], 2, partition="camvid-dir0.5:12")
    assert cfg.partition == "camvid-dir0.5:12" and cfg.federation.seed == 2 and cfg.train.num_clusters == PRESETS["camvid"].num_clusters == 11
    with pytest.raises(ConfigError, match="not a preset of camvid"):
        base_config("camvid", BUDGETS["full"], 0, partition="polyp-dir0.1:4")


def test_verdicts_and_drift_table_from_records(tmp_path):
    from benchmarks.paper import claim_differences, drift_rows, figures, verdict

    def run(setting, seed, miou, drift=None):
        r = {"setting": setting, "seed": seed, "table": "main", "eval": {"miou": miou, "pixel_acc": 0.5,
                                                                          "crf_miou": miou, "crf_pixel_acc": 0.5}}
        if drift is not None:
            r["round_details"] = [{"round": i, "drift": d} for i, d in enumerate(drift)]
        return r

    d0 = {"site_indexwise_mean": 0.9, "site_matched_mean": 0.95, "site_matched_min": 0.5, "fedavg_fedcc_mean": 0.8,
          "fedavg_fedcc_min": 0.3}
    d1 = {k: v - 0.1 for k, v in d0.items()}
    runs = [run("FedAvg", s, m, [d0, d1]) for s, m in ((0, 0.20), (1, 0.22), (2, 0.21))]
    runs += [run("FedAvg+FedCC", s, m, [d1, d1]) for s, m in ((0, 0.21), (1, 0.23), (2, 0.20))]
    runs += [run("centralized", s, m) for s, m in ((0, 0.215), (1, 0.225), (2, 0.205))]
    runs += [run("local-only", s, m) for s, m in ((0, 0.10), (1, 0.12), (2, 0.11))]
    claims = {c["claim"]: c for c in claim_differences(runs)}
    assert claims["FedCC beats FedAvg"]["diffs"] == pytest.approx([1.0, 1.0, -1.0])
    assert claims["FedCC beats FedAvg"]["verdict"] == "not shown"
    assert claims["FedAvg beats local-only (mean)"]["verdict"] == "holds"
    # FedCC - centralized = -0.5, +0.5, -0.5 points: within a point on every seed
    assert claims["FedAvg+FedCC approaches or beats centralized"]["verdict"] == "holds"
    assert verdict({"claim": "FedCC beats FedAvg", "diffs": [-0.1, -2.0, -0.5]}) == "reversed"
    assert verdict({"claim": "X approaches or beats Y", "diffs": [-1.5, -3.0, -1.1]}) == "reversed"
    assert verdict({"claim": "X matches Y", "diffs": [0.4, -0.9, 0.0]}) == "holds"
    assert verdict({"claim": "FedCC beats FedAvg", "diffs": [2.0]}) == "open (1 seed)"
    rows = drift_rows(runs)
    assert sorted(rows) == ["FedAvg", "FedAvg+FedCC"]
    assert rows["FedAvg"][0]["site_matched_mean"] == pytest.approx(0.95) and rows["FedAvg"][1]["seeds"] == 3
    assert rows["FedAvg+FedCC"][0]["fedavg_fedcc_min"] == pytest.approx(0.2)
    text = markdown_tables(runs, "camvid", "full")
    assert "| FedAvg | 1 | 0.800 | 0.850 | 0.400 | 0.700 | 0.200 | 3 |" in text
    assert "| not shown |" in text and "| holds |" in text
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    written = figures(tmp_path / "runs.json", tmp_path / "figures", "skew")
    assert tmp_path / "figures" / "skew_centroid_drift.png" in written and written[-1].stat().st_size > 10_000
