"""Long honest rounds against the server's screening: one real camvid site trains a round of N local steps from
the initial global model, and the default screening (``screening.screen_updates`` with the round's steps, as
the FLARE aggregator and the in-process runner call it) judges the update.

Measured per N: the head's relative change (distance to the global head over its norm), the cosine between the
two heads, the bound ``screening.change_bound`` allows for N steps, and whether the update was accepted. The
same updates with their head sign-flipped or scaled by 10 (two hostile kinds of ``tests/test_aggregation.py``)
stay rejected. Results: ``docs/results/long_rounds.json`` and the table of ``docs/reliability.md``.

    python -m benchmarks.long_rounds --site 0016E5 --steps 250 1000 3000 5000
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from fuss_components.aggregation import ClientUpdate
from fuss_components.screening import change_bound, screen_updates
from fuss_components.config import FussConfig
from fuss_components.files import atomic_write_json
from fuss_components.site import Site, init_global_state

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="0016E5", help="camvid training site")
    parser.add_argument("--steps", type=int, nargs="+", default=[250, 1000, 3000, 5000])
    parser.add_argument("--out", default=str(RESULTS / "long_rounds.json"))
    return parser


def relative_change(head: dict, reference: dict) -> tuple[float, float]:
    keys = sorted(reference)
    a = torch.cat([head[k].double().flatten() for k in keys])
    b = torch.cat([reference[k].double().flatten() for k in keys])
    change = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    return change, float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def judge(cfg: FussConfig, site: str, head: dict, centroids: torch.Tensor, count: int, reference: dict,
          steps: int) -> str | None:
    """The default screening's reason to reject (None: accepted). Two more honest-looking peers make the
    centroid-outlier check active, as in a federation of three sites."""
    peers = [ClientUpdate(f"peer{i}", {k: v.clone() for k, v in reference.items()}, centroids.clone(), count)
             for i in range(2)]
    update = ClientUpdate(site, head, centroids, count)
    declared = {u.site: count for u in [update, *peers]}
    _, rejected = screen_updates([update, *peers], reference, len(centroids), centroids.shape[1],
                                 federation=cfg.federation, declared_counts=declared,
                                 round_steps={s: steps for s in declared})
    return next((why for who, why in rejected if who == site), None)


def main(args: argparse.Namespace) -> dict:
    cfg = FussConfig()
    site = Site(cfg, args.site)
    trainer = site.trainer
    num_clusters = trainer.num_clusters
    start = init_global_state(cfg, num_clusters)
    reference = {k[len("head."):]: v for k, v in start.items() if k.startswith("head.")}
    rows = []
    for steps in args.steps:
        began = time.perf_counter()
        result = trainer.train(start, 0, steps=steps)
        head = {k[len("head."):]: v for k, v in result.state.items() if k.startswith("head.")}
        change, cosine = relative_change(head, reference)
        centroids = result.state["centroids"]
        honest = judge(cfg, args.site, head, centroids, result.num_samples, reference, steps)
        flipped = judge(cfg, args.site, {k: -v for k, v in head.items()}, centroids, result.num_samples, reference,
                        steps)
        scaled = judge(cfg, args.site, {k: 10 * v for k, v in head.items()}, centroids, result.num_samples,
                       reference, steps)
        rows.append({"steps": steps, "relative_change": change, "cosine": cosine,
                     "bound": change_bound(cfg.federation, steps), "accepted": honest is None, "rejection": honest,
                     "sign_flipped_rejected": flipped is not None, "scaled_x10_rejected": scaled is not None,
                     "seconds": time.perf_counter() - began})
        print(f"{steps:>5} steps: change {change:.3f} (bound {rows[-1]['bound']:.3f}), cosine {cosine:.3f}, "
              f"{'accepted' if honest is None else 'REJECTED: ' + honest}; flipped rejected {flipped is not None}, "
              f"x10 rejected {scaled is not None} ({rows[-1]['seconds']:.0f} s)", flush=True)
    out = {"site": args.site, "images": result.num_samples, "config": "FussConfig() defaults (the main job's)",
           "sqrt_fit": math.exp(sum(math.log(r["relative_change"] / math.sqrt(r["steps"])) for r in rows) / len(rows)),
           "rows": rows, "machine": platform.processor() or platform.machine(), "torch_threads":
           torch.get_num_threads(), "backbone_caveat": "DINOv2 ViT-S/14 (the only backbone obtainable offline), "
           "not the paper's DINO ViT-B/8: docs/results.md"}
    atomic_write_json(Path(args.out), out)
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
