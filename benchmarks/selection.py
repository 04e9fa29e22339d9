"""Do the label-free selection criteria track validation mIoU?

Pairs, for every round of every given run, the label-free criteria of a global model (``fuss_components.selection``)
with the validation mIoU of the SAME model, and reports per criterion Spearman's rank correlation with mIoU over
all rounds of all runs (pooled) and per run, and per run which round the criterion would select and how much mIoU
that costs against the best round (regret). Reads ``metrics.json`` files of two kinds:

* FLARE runs (``fuss_flare.recorder``): ``rounds[r]["selection"]`` beside ``rounds[r]["val_miou"]``, both of the
  global model aggregated in round ``r`` (the criteria are means over the training sites weighted by the images
  each declared; the last round's model has no criteria);
* in-process federated runs (``fuss_components.runner.run_federated``): the sites' criteria of round ``r``'s model
  are in ``rounds[r + 1]["train"][site]`` (a site measures the model it receives), its mIoU in
  ``rounds[r]["miou"]``; the runner records no sample counts, so there the sites count equally.

The initial model is left out: it is never a candidate for selection, and a random model's low mIoU would lift
every correlation. ``rho`` is signed so that a positive value means "the criterion's better direction goes with
higher mIoU" (``correspondence``: lower is better). A criterion *tracks* mIoU when its pooled signed rho is at
least ``--min-rho`` over at least ``--min-pairs`` rounds and no run with three or more rounds has a negative one.
Writes ``docs/results/selection.json`` (``--out``) and prints a table; reads JSON only: seconds.

    python -m benchmarks.selection runs/*/ws/job/server/simulate_job/app_server/metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

from fuss_components.files import atomic_write_json
from fuss_components.selection import CRITERIA, HIGHER_IS_BETTER, METRIC_PREFIX, better

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "results" / "selection.json"
MIN_RUN_ROUNDS = 3  # a run's own rho counts against a criterion from this many paired rounds on


def flare_pairs(history: dict) -> list[dict]:
    """``[{"round", "miou", "criteria"}]`` of a FLARE metrics.json: rounds with both criteria and a validation."""
    return [{"round": r["round"], "miou": float(r["val_miou"]), "criteria": dict(r["selection"])}
            for r in history.get("rounds", []) if r.get("selection") and r.get("val_miou") is not None]


def runner_pairs(history: dict) -> list[dict]:
    """The same pairs from an in-process federated run's metrics.json (equal-weight mean over the sites)."""
    rounds = history.get("rounds", [])
    pairs = []
    for model_round, measured in zip(rounds, rounds[1:]):
        criteria = {}
        for name in CRITERIA:
            values = [m[METRIC_PREFIX + name] for m in measured.get("train", {}).values()
                      if isinstance(m, dict) and isinstance(m.get(METRIC_PREFIX + name), (int, float))]
            if values:
                criteria[name] = statistics.fmean(values)
        if criteria and model_round.get("miou") is not None:
            pairs.append({"round": model_round["round"], "miou": float(model_round["miou"]), "criteria": criteria})
    return pairs


def communication(history: dict, share: float = 0.95) -> dict | None:
    """Rounds (and the bytes the sites sent up to the server) until a FLARE run's global model first reaches
    ``share`` of its final validation mIoU; None without per-round validation."""
    rounds = [r for r in history.get("rounds", []) if r.get("val_miou") is not None]
    if not rounds:
        return None
    final = float(rounds[-1]["val_miou"])
    sent = 0
    for r in rounds:
        sent += sum(int(e.get("bytes", 0)) for e in r.get("train", {}).values() if isinstance(e, dict))
        if float(r["val_miou"]) >= share * final:
            return {"share": share, "final_miou": final, "rounds": r["round"] + 1, "uplink_bytes": sent,
                    "miou": float(r["val_miou"])}
    return None  # unreachable: the final round reaches its own value


def read_run(path: Path) -> dict:
    """``{"file", "kind", "pairs"}`` of one metrics.json; ValueError naming the file for any other kind."""
    history = json.loads(Path(path).read_text())
    if history.get("mode") == "federated":
        return {"file": str(path), "kind": "runner", "pairs": runner_pairs(history)}
    if "sites" in history and "rounds" in history:
        return {"file": str(path), "kind": "flare", "pairs": flare_pairs(history),
                "communication": communication(history)}
    raise ValueError(f"{path}: neither a FLARE recorder's nor an in-process federated run's metrics.json (a "
                     f"{history.get('mode', 'unknown')!r} run has no rounds of a global model)")


def signed_spearman(criterion: str, values: list[float], mious: list[float]) -> float | None:
    """Spearman's rho of ``values`` with ``mious``, signed by the criterion's better direction; None when it is
    undefined (fewer than three pairs, or a constant series)."""
    if len(values) < 3 or len(set(values)) < 2 or len(set(mious)) < 2:
        return None
    rho = float(spearmanr(values, mious).statistic)
    if math.isnan(rho):
        return None
    return rho if HIGHER_IS_BETTER[criterion] else -rho


def summarize_run(run: dict) -> dict:
    """Per criterion: signed rho, the round it selects, that round's mIoU and the regret to the best round."""
    pairs = run["pairs"]
    out = {"file": run["file"], "kind": run["kind"], "rounds": len(pairs), "criteria": {},
           "communication": run.get("communication")}
    if not pairs:
        return out
    best = max(pairs, key=lambda p: p["miou"])
    out["best"] = {"round": best["round"], "miou": best["miou"]}
    for name in CRITERIA:
        have = [p for p in pairs if name in p["criteria"]]
        if not have:
            continue
        chosen = None
        for pair in have:
            if chosen is None or better(name, pair["criteria"][name], chosen["criteria"][name]):
                chosen = pair
        out["criteria"][name] = {
            "rho": signed_spearman(name, [p["criteria"][name] for p in have], [p["miou"] for p in have]),
            "pairs": len(have), "selected_round": chosen["round"], "selected_miou": chosen["miou"],
            "regret": best["miou"] - chosen["miou"]}
    return out


def summarize(runs: list[dict], min_rho: float = 0.7, min_pairs: int = 5) -> dict:
    """The whole report: per run (:func:`summarize_run`) and pooled over every run's rounds."""
    per_run = [summarize_run(run) for run in runs]
    pooled = {}
    for name in CRITERIA:
        have = [p for run in runs for p in run["pairs"] if name in p["criteria"]]
        run_rhos = [r["criteria"][name]["rho"] for r in per_run if name in r["criteria"]
                    and r["criteria"][name]["pairs"] >= MIN_RUN_ROUNDS and r["criteria"][name]["rho"] is not None]
        regrets = [r["criteria"][name]["regret"] for r in per_run if name in r["criteria"]]
        rho = signed_spearman(name, [p["criteria"][name] for p in have], [p["miou"] for p in have])
        pooled[name] = {"rho": rho, "pairs": len(have),
                        "mean_run_rho": statistics.fmean(run_rhos) if run_rhos else None,
                        "mean_regret": statistics.fmean(regrets) if regrets else None,
                        "tracks": rho is not None and rho >= min_rho and len(have) >= min_pairs
                        and all(r >= 0 for r in run_rhos)}
    return {"rule": {"min_rho": min_rho, "min_pairs": min_pairs, "min_run_rounds": MIN_RUN_ROUNDS,
                     "initial_model": "left out", "rho": "Spearman, signed: > 0 = better criterion, higher mIoU"},
            "runs": per_run, "pooled": pooled,
            "tracking": [name for name in CRITERIA if pooled[name]["tracks"]]}


def table(report: dict) -> str:
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [f"{'criterion':<15} {'pairs':>5} {'rho':>7} {'run rho':>8} {'regret':>8}  tracks"]
    for name, row in report["pooled"].items():
        lines.append(f"{name:<15} {row['pairs']:>5} {fmt(row['rho']):>7} {fmt(row['mean_run_rho']):>8} "
                     f"{fmt(row['mean_regret'], '.4f'):>8}  {'yes' if row['tracks'] else 'no'}")
    lines.append(f"criteria that track mIoU: {', '.join(report['tracking']) or 'none'} "
                 f"({len(report['runs'])} run(s))")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics.json files of FLARE runs or in-process federated runs")
    parser.add_argument("--min-rho", type=float, default=0.7, help="pooled signed Spearman rho a criterion needs")
    parser.add_argument("--min-pairs", type=int, default=5, help="paired rounds the pooled rho needs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON report (default {DEFAULT_OUT})")
    return parser


def main(args: argparse.Namespace) -> int:
    runs = [read_run(Path(path)) for path in args.metrics]
    for run in runs:
        if not run["pairs"]:
            print(f"{run['file']}: no round with both label-free criteria and a validation mIoU", file=sys.stderr)
    report = summarize(runs, args.min_rho, args.min_pairs)
    atomic_write_json(args.out, report)
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
