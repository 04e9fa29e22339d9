#!/usr/bin/env python3
"""Effect of the centroid privacy filter on mIoU: one in-process federation per noise level.

    python poc/privacy_sweep.py --sigmas 0,0.1,0.3,1,3 --clip 1 --rounds 3 --local-steps 50 \
        --out runs/privacy_sweep/privacy_sweep.json   # the default; the recorded table: docs/deployment.md 5.4

Each run is ``fuss_components.runner.run_federated`` (the same sites, trainer, screening and aggregation code as
the FLARE job; ``fuss train --mode federated``) with every training site's centroids passed through
``fuss_components.privacy.privatize_centroids`` after its local training, before aggregation: exactly the
function ``CentroidPrivacyFilter`` applies to a site's result in FLARE (the site keeps its own, un-noised copy,
as in FLARE, where the filter acts on the message). The noise is seeded per (site, round, sigma) so the table is
reproducible; the filter itself uses fresh OS entropy. ``sigma = none`` is the run without any filter.
Reported per level: validation mIoU / pixel accuracy of the final global model (no CRF) and the (epsilon, delta)
of ``fuss_components.privacy.account`` for the run's rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def private_sites(clip: float, sigma: float | None, seed: int):
    """Patch ``Site.train`` so every released centroid matrix is clipped and noised (None: untouched)."""
    import torch

    from fuss_components.privacy import privatize_centroids
    from fuss_components.site import Site
    from fuss_components.trainer import LocalResult, stable_seed

    original = Site.train
    released: list[int] = []

    def train(self, global_state, round_idx):
        result = original(self, global_state, round_idx)
        if sigma is None:
            return result
        gen = torch.Generator().manual_seed(stable_seed(seed, "privacy", self.name, round_idx, sigma))
        centroids, clipped = privatize_centroids(result.state["centroids"], clip, sigma, gen)
        released.append(clipped)
        return LocalResult(state={**result.state, "centroids": centroids}, num_samples=result.num_samples,
                           metrics=dict(result.metrics))

    Site.train = train
    try:
        yield released
    finally:
        Site.train = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="camvid")
    parser.add_argument("--sigmas", default="none,0,0.1,0.3,1,3", help="comma list; 'none' = no filter")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=None, help="default: fuss_components.privacy.DEFAULT_DELTA")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/privacy_sweep/privacy_sweep.json")
    args = parser.parse_args(argv)

    from fuss_components.privacy import DEFAULT_DELTA, account

    args.delta = DEFAULT_DELTA if args.delta is None else args.delta
    from fuss_components.runner import run_federated
    from fuss_components.site import build_model
    from fuss_components.presets import preset_config

    cfg = preset_config(args.preset)
    overrides = {"federation.rounds": args.rounds, "federation.local_steps": args.local_steps,
                 "federation.seed": args.seed}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = cfg.with_overrides(overrides)
    build_model(cfg)  # see tests/test_flare_sim.py: warm up timm before the seeded initial model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in args.sigmas.split(","):
        sigma = None if text.strip() == "none" else float(text)
        started = time.perf_counter()
        with private_sites(args.clip, sigma, args.seed) as released:
            result = run_federated(cfg, out.parent / f"sigma_{text.strip()}", progress=False)
        k = cfg.train.num_clusters
        acc = account(k, args.clip, sigma, args.delta, args.rounds) if sigma else None
        row = {
            "sigma": sigma, "clip": args.clip if sigma is not None else None,
            "miou": result["miou"], "pixel_acc": result["pixel_acc"],
            "miou_per_round": [r["miou"] for r in result["rounds"]],
            "rows_clipped_per_release": released[:12],
            "epsilon_per_round": None if acc is None else acc.epsilon,
            "epsilon_total_simple": None if acc is None else acc.total_epsilon,
            "delta_total_simple": None if acc is None else acc.total_delta,
            "epsilon_total_gdp": None if acc is None else acc.total_epsilon_gdp,
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        eps = "inf" if acc is None or math.isinf(acc.epsilon) else f"{acc.epsilon:.3g}"
        print(f"sigma={text.strip():>5} clip={args.clip:g}: mIoU {row['miou']:.4f} acc {row['pixel_acc']:.4f} "
              f"epsilon/round {eps} ({row['seconds']} s)", flush=True)
        out.write_text(json.dumps({"config": cfg.to_dict(), "clip": args.clip, "delta": args.delta,
                                   "rounds": args.rounds, "runner": "fuss_components.runner.run_federated + "
                                   "fuss_components.privacy.privatize_centroids", "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
