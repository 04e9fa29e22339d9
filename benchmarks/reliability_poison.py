"""What one poisoned client of three does to mIoU under each aggregation rule (every attack x every rule).

    FUSS_SHARED=../shared FUSS_CACHE_DIR=/path/to/camvid/cache OMP_NUM_THREADS=2 \\
        python -m benchmarks.reliability_poison --clients 3 --rounds 3 --local-steps 30 --validation-every 4 \\
        --out docs/results/reliability_poison.json

An in-process federation with the same Site / LocalTrainer / screen_updates / aggregate calls as the runner and the
FLARE aggregator: CamVid's training sequences cut into frame-range clients (benchmarks.reliability_scale), one of
them the attacker, every ``--validation-every``-th frame of Seq05VD validates the final global model. Screening
gets each site's real image count as its declared count (``declared_counts``), as the FLARE server does with the
counts the sites declare when the job starts. Attacks on the attacker's honest result (h = its trained head,
c = its centroids, n = its image count, g = the global head it received):

* ``clean``: no attack (the reference of each rule);
* ``scaled``: head g + 100 (h - g);
* ``flipped``: head -h (sign-flipped);
* ``flipped_small``: head g - (h - g), the update reversed but as long as an honest one, so it stays inside
  ``federation.max_relative_change``: screening passes it and only the aggregation rule can hold;
* ``inflated_count``: honest head and centroids, claims 100 n images;
* ``random_centroids``: honest head, centroids Gaussian with rows of norm about 1;
* ``spoofed_name``: the attacker's honest result declares the first honest client's name. It goes through the
  FLARE server's own check, ``fuss_flare.aggregator.FussAggregator.accept``, as a FLARE Shareable whose
  authenticated peer identity is the attacker; a result that check refuses never reaches screening.

Rules: ``--aggregators`` (FedAvg / FedCC-kmeans centroids) x ``--robust`` (none / median / trimmed-mean / clip).
Each (rule, attack) run starts from the same seeded global model; ``min_clients`` is 1 so that a rejection never
stops the round. Local training is seeded per (seed, site, round), so one site given one global state in one round
always returns the same result: results and validations are memoised by the exact global state (sha256 of its
tensors), which runs sharing a trajectory (e.g. every attack that screening rejects in every round) reuse.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch

from benchmarks.reliability_scale import frame_range_partition
from fuss_components.files import atomic_write_json

ATTACKS = ("clean", "scaled", "flipped", "flipped_small", "inflated_count", "random_centroids", "spoofed_name")
AGGREGATORS = ("fedavg", "fedcc-kmeans")
ROBUST = ("none", "median", "trimmed-mean", "clip")
DEFAULT_RULE = ("fedcc-kmeans", "none")  # the configuration's defaults: the reference every delta is also given to


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def relative_change(head: dict[str, torch.Tensor], global_head: dict[str, torch.Tensor]) -> float:
    """||head - g|| / ||g||, what screening compares with federation.max_relative_change."""
    moved = sum(float(((head[k].double() - v.double()) ** 2).sum()) for k, v in global_head.items()) ** 0.5
    return moved / sum(float((v.double() ** 2).sum()) for v in global_head.values()) ** 0.5


def poison(kind: str, update, global_head: dict[str, torch.Tensor], seed: int):
    """The attacker's ClientUpdate for ``kind`` (the honest ``update`` is not modified)."""
    from fuss_components.aggregation import ClientUpdate

    head, centroids, count = update.head, update.centroids, update.num_samples
    if kind == "scaled":
        head = {k: g + 100.0 * (head[k] - g) for k, g in global_head.items()}
    elif kind == "flipped":
        head = {k: -v for k, v in head.items()}
    elif kind == "flipped_small":
        head = {k: g - 1.0 * (head[k] - g) for k, g in global_head.items()}
    elif kind == "inflated_count":
        count = 100 * count
    elif kind == "random_centroids":
        gen = torch.Generator().manual_seed(seed)
        # N(0, 1/D) per coordinate: rows of norm about 1, like honest centroids, so no norm bound can catch them
        centroids = torch.randn(centroids.shape, generator=gen) / centroids.shape[1] ** 0.5
    elif kind != "spoofed_name":
        raise ValueError(f"unknown attack {kind!r}")
    return ClientUpdate(update.site, head, centroids, count, dict(update.metrics))


def flare_server_refusal(update, authenticated_as: str, declared_site: str) -> str | None:
    """Why the FLARE server's ``FussAggregator.accept`` refuses ``update`` sent by the FLARE client
    ``authenticated_as`` with ``declared_site`` in its meta, or None when it accepts it."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    from fuss_components.head import join_state
    from fuss_flare import META_NUM_SAMPLES, META_SITE, SESSION_CLIENT_HEADER
    from fuss_flare.aggregator import FussAggregator

    meta = {META_SITE: declared_site, META_NUM_SAMPLES: update.num_samples, MetaKey.INITIAL_METRICS: update.metrics}
    result = DXO(DataKind.WEIGHTS, data=join_state(update.head, update.centroids), meta=meta).to_shareable()
    result.set_peer_props({ReservedKey.IDENTITY_NAME: authenticated_as})
    result.set_header(SESSION_CLIENT_HEADER, authenticated_as)  # as FussController stamps it
    server = FussAggregator()
    if server.accept(result, FLContext()):
        return None
    # accept() keeps the reason for the round's screening report
    return f"site {authenticated_as!r}: {server._rejected[-1][1]}"


class Federation:
    """The sites, the validation site and the memoised site results / validations shared by every run."""

    def __init__(self, sites, validation_site, cfg):
        self.sites, self.validation_site, self.cfg = sites, validation_site, cfg
        self._results: dict[tuple[str, int, str], object] = {}
        self._scores: dict[str, dict] = {}
        self.trainings = self.validations = 0

    def site_update(self, site, state: dict[str, torch.Tensor], digest: str, round_idx: int):
        from fuss_components.aggregation import ClientUpdate
        from fuss_components.head import split_state

        key = (site.name, round_idx, digest)
        if key not in self._results:
            result = site.train(state, round_idx)
            self._results[key] = ClientUpdate(site.name, *split_state(result.state), result.num_samples,
                                              dict(result.metrics))
            self.trainings += 1
        return self._results[key]

    def validate(self, state: dict[str, torch.Tensor], digest: str) -> dict:
        if digest not in self._scores:
            self._scores[digest] = self.validation_site.validate(state)
            self.validations += 1
        return self._scores[digest]

    def run(self, fed, attacker: str, attack: str, rounds: int) -> dict:
        from fuss_components.aggregation import aggregate
        from fuss_components.screening import screen_updates
        from fuss_components.head import join_state, split_state
        from fuss_components.site import init_global_state

        clusters = self.validation_site.num_clusters
        declared = {s.name: s.num_samples for s in self.sites}
        spoofed_site = next(s.name for s in self.sites if s.name != attacker)
        state = init_global_state(self.cfg, clusters)
        history = []
        for r in range(rounds):
            global_head, global_centroids = split_state(state)
            digest = state_digest(state)
            updates, refused = [], []
            for site in self.sites:
                update = self.site_update(site, state, digest, r)
                if site.name == attacker and attack != "clean":
                    update = poison(attack, update, global_head, seed=r)
                    if attack == "spoofed_name":
                        reason = flare_server_refusal(update, attacker, spoofed_site)
                        if reason is not None:
                            refused.append((attacker, reason))
                            continue
                        # accepted: the server keys it by the authenticated name, so it counts as the attacker's
                updates.append(update)
            accepted, rejected = screen_updates(updates, global_head, clusters, global_centroids.shape[1],
                                                federation=fed, declared_counts=declared,
                                                reject_all_duplicates=True)
            rejected = refused + list(rejected)
            state = join_state(*aggregate(accepted, fed, clusters, reference_head=global_head))
            history.append({
                "round": r,
                "accepted": sorted(u.site for u in accepted),
                "rejected": [[site, reason] for site, reason in rejected],
                "relative_change": {u.site: round(relative_change(u.head, global_head), 4) for u in updates},
            })
        scores = self.validate(state, state_digest(state))
        return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "clusters_used": scores["clusters_used"],
                "rounds": history}


def add_deltas(runs: list[dict]) -> None:
    """Each run's mIoU minus the clean run of its own rule and of the default rule (points of mIoU, in %)."""
    clean = {(r["aggregator"], r["robust"]): r["miou"] for r in runs if r["attack"] == "clean"}
    for r in runs:
        own = clean.get((r["aggregator"], r["robust"]))
        default = clean.get(DEFAULT_RULE)
        r["delta_vs_clean_same_rule"] = None if own is None else round(100 * (r["miou"] - own), 2)
        r["delta_vs_clean_default"] = None if default is None else round(100 * (r["miou"] - default), 2)


def markdown_table(runs: list[dict], attacker: str) -> str:
    """attack x rule: mIoU in %, delta to the clean default, and the rounds in which the attacker was rejected."""
    rules = list(dict.fromkeys((r["aggregator"], r["robust"]) for r in runs))
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    by_key = {(r["aggregator"], r["robust"], r["attack"]): r for r in runs}
    lines = ["| attack | " + " | ".join(f"{a} + {m}" for a, m in rules) + " |",
             "|---" * (len(rules) + 1) + "|"]
    for attack in attacks:
        cells = []
        for rule in rules:
            r = by_key.get((*rule, attack))
            if r is None:
                cells.append("-")
                continue
            hits = sum(any(site == attacker for site, _ in h["rejected"]) for h in r["rounds"])
            delta = r["delta_vs_clean_default"]
            cell = f"{100 * r['miou']:.2f}" + ("" if delta is None else f" ({delta:+.2f})")
            cells.append(cell + (f" R{hits}/{len(r['rounds'])}" if hits else ""))
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fuss_components.config import FussConfig
    from fuss_components.datasets import open_dataset
    from fuss_components.paths import data_root
    from fuss_components.site import Site

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--attacker", default=None, help="client name (default: the last one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--validation-every", type=int, default=4, help="validate on every k-th Seq05VD frame")
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--robust", nargs="+", default=list(ROBUST))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    started_all = time.perf_counter()
    dataset = open_dataset("camvid", data_root())
    part = frame_range_partition(dataset, args.clients, validation_every=args.validation_every)
    cfg = FussConfig.from_dict({"train": {"num_clusters": 11}, "federation": {
        "rounds": args.rounds, "local_steps": args.local_steps, "min_clients": 1}})
    sites = [Site(cfg, name, part, dataset) for name in part.clients]
    validation_site = Site(cfg, "Seq05VD", part, dataset)
    federation = Federation(sites, validation_site, cfg)
    attacker = args.attacker or sites[-1].name
    if attacker not in {s.name for s in sites}:
        parser.error(f"--attacker {attacker!r} is not one of {[s.name for s in sites]}")
    results = {"command": "python -m benchmarks.reliability_poison " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
               "backbone": cfg.to_dict()["backbone"], "clients": {s.name: s.num_samples for s in sites},
               "attacker": attacker, "rounds": args.rounds, "local_steps": args.local_steps,
               "validation": {"site": validation_site.name, "every": args.validation_every,
                              "images": len(validation_site.validation_ids)},
               "trim_fraction": args.trim_fraction, "default_rule": list(DEFAULT_RULE), "runs": []}
    for aggregator in args.aggregators:
        for robust in args.robust:
            fed = cfg.with_overrides({"federation.aggregator": aggregator, "federation.robust": robust,
                                      "federation.trim_fraction": args.trim_fraction}).federation
            for attack in args.attacks:
                started = time.perf_counter()
                out = federation.run(fed, attacker, attack, args.rounds)
                out = {"aggregator": aggregator, "robust": robust, "attack": attack, **out,
                       "seconds": round(time.perf_counter() - started, 1)}
                results["runs"].append(out)
                print(json.dumps({k: out[k] for k in ("aggregator", "robust", "attack", "miou", "seconds")}
                                 | {"rejected": [sorted({s for s, _ in h["rejected"]}) for h in out["rounds"]]}),
                      flush=True)
    add_deltas(results["runs"])
    results.update(trainings=federation.trainings, validations=federation.validations,
                   seconds_total=round(time.perf_counter() - started_all, 1))
    print(markdown_table(results["runs"], attacker))
    print(f"{len(results['runs'])} runs, {federation.trainings} site trainings, {federation.validations} "
          f"validations, {results['seconds_total']} s")
    if args.out:
        atomic_write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
