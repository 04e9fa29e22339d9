"""What one poisoned client does to mIoU, with and without robust aggregation (issue 6, point 3).

    FUSS_SHARED=../shared FUSS_CACHE_DIR=/path/to/camvid/cache \
        python benchmarks/reliability_poison.py --clients 6 --rounds 5 --local-steps 30 \
        --out docs/results/reliability_poison.json

An in-process federation with the same Site / LocalTrainer / screen_updates / aggregate calls as the runner and the
FLARE aggregator: CamVid's training sequences cut into frame-range clients (benchmarks/reliability_scale.py), one
of them the attacker, Seq05VD validates the final global model. Attacks on the attacker's honest update
(h = its trained head, c = its centroids, g = the global head it received):

* ``flip``: head g - 10 (h - g) (sign-flipped and boosted 10x: accepted by the 1e3 x median screening limit),
  centroids -c;
* ``headflip``: head as in ``flip``, centroids honest (so only the head rule can defend);
* ``noise``: head g + noise with 100 x the norm of (h - g), centroids replaced by random Gaussian vectors.

Every (robust mode, attack) pair starts from the same seeded global model; ``clean`` is the no-attack reference.
min_clients is 1 here so that a rejection never stops the round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_scale import frame_range_partition  # noqa: E402

ATTACKS = ("clean", "flip", "headflip", "noise")
MODES = ("none", "median", "trimmed-mean")


def poison(kind: str, head: dict, centroids: torch.Tensor, global_head: dict, seed: int):
    if kind in ("flip", "headflip"):
        flipped = {k: global_head[k] - 10.0 * (v - global_head[k]) for k, v in head.items()}
        return flipped, (-centroids if kind == "flip" else centroids)
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        delta = {k: torch.randn(v.shape, generator=gen) for k, v in head.items()}
        honest = sum(float(((v - global_head[k]) ** 2).sum()) for k, v in head.items()) ** 0.5
        norm = sum(float((d ** 2).sum()) for d in delta.values()) ** 0.5
        head = {k: global_head[k] + delta[k] * (100.0 * honest / norm) for k in head}
        return head, torch.randn(centroids.shape, generator=gen)
    raise ValueError(kind)


def run(sites, validation_site, cfg, fed, attacker: str, attack: str, rounds: int) -> dict:
    from fuss_components.aggregation import ClientUpdate, aggregate, screen_updates
    from fuss_components.head import join_state, split_state
    from fuss_components.site import init_global_state

    clusters = validation_site.num_clusters
    state = init_global_state(cfg, clusters)
    history = []
    for r in range(rounds):
        ref_head, ref_cent = split_state(state)
        updates = []
        for site in sites:
            result = site.train(state, r)
            head, cent = split_state(result.state)
            if site.name == attacker and attack != "clean":
                head, cent = poison(attack, head, cent, ref_head, seed=r)
            updates.append(ClientUpdate(site.name, head, cent, result.num_samples, result.metrics))
        accepted, rejected = screen_updates(updates, ref_head, clusters, ref_cent.shape[1], federation=fed,
                                            reject_all_duplicates=True)
        state = join_state(*aggregate(accepted, fed, clusters))
        history.append({"round": r, "rejected": sorted({s for s, _ in rejected})})
    scores = validation_site.validate(state)
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "clusters_used": scores["clusters_used"],
            "rounds": history}


def main(argv: list[str] | None = None) -> int:
    from fuss_components.config import FussConfig
    from fuss_components.datasets import open_dataset
    from fuss_components.paths import data_root
    from fuss_components.site import Site

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--attacker", default=None, help="client name (default: the last one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--aggregator", default="fedcc-kmeans")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    dataset = open_dataset("camvid", data_root())
    part = frame_range_partition(dataset, args.clients)
    cfg = FussConfig.from_dict({"train": {"num_clusters": 11}, "federation": {
        "rounds": args.rounds, "local_steps": args.local_steps, "aggregator": args.aggregator, "min_clients": 1}})
    sites = [Site(cfg, name, part, dataset) for name in part.clients]
    validation_site = Site(cfg, "Seq05VD", part, dataset)
    attacker = args.attacker or sites[-1].name
    results = {"clients": {s.name: s.num_samples for s in sites}, "attacker": attacker, "rounds": args.rounds,
               "local_steps": args.local_steps, "aggregator": args.aggregator, "runs": []}
    for mode in args.modes:
        fed = cfg.with_overrides({"federation.robust": mode, "federation.trim_fraction": args.trim_fraction}).federation
        for attack in args.attacks:
            started = time.perf_counter()
            out = run(sites, validation_site, cfg, fed, attacker, attack, args.rounds)
            out.update(mode=mode, attack=attack, trim_fraction=args.trim_fraction, seconds=round(time.perf_counter() - started, 1))
            results["runs"].append(out)
            print(json.dumps({k: out[k] for k in ("mode", "attack", "miou", "pixel_acc", "clusters_used", "seconds")}
                             | {"rejected": [h["rejected"] for h in out["rounds"]]}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
