"""FUSS site: Client API script, run in-process by FLARE's ``ClientAPIExecutor`` for the tasks
``site_info``, ``train`` and ``validate`` (see ``fuss_flare.__init__`` for the wire format).

The site is ``fuss_components.site.Site(cfg, flare.get_site_name())``: it resolves the partition of the job's
config (a simulator name ``site-N`` is the N-th site of the partition: training sites first, then validation-only
sites), finds the site's images under its data root, builds or reuses the feature cache on first use, and trains /
evaluates. Images and features never leave the site; what does leave is filtered again by ``FussResultFilter``.

Configuration: ``--config fuss_config.json`` (shipped in the job's custom folder), then optional site-local
overrides from the JSON file named by ``$FUSS_SITE_CONFIG`` (dotted keys, e.g.
``{"data.root": "/data/fuss", "cache_dir": "/scratch/fuss_cache"}``); ``$FUSS_DATA_ROOT`` / ``$FUSS_CACHE_DIR``
apply when the config leaves them unset (``fuss_components.paths``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fuss_components.config import FussConfig
from fuss_flare import CONFIG_FILE, META_NUM_SAMPLES, META_SITE, TASK_SITE_INFO, VALIDATION_METRICS, to_torch_state

SITE_CONFIG_ENV = "FUSS_SITE_CONFIG"
# TEST-ONLY fault injection: "<flare site name>:<fault>[+<fault>][,...]", fault in nan | extra_centroid | bad_shape | leak.
# Used by tests/test_flare_sim.py to prove that the server rejects bad updates (nan, extra_centroid, bad_shape)
# and that the result filter strips undeclared content before it leaves the site (leak). Never set it in a real
# deployment; it does nothing when unset.
TEST_CORRUPT_ENV = "FUSS_TEST_CORRUPT_UPDATE"


def load_site_config(config: str) -> FussConfig:
    path = Path(config)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path  # the app's custom folder
    cfg = FussConfig.load(path)
    site_cfg = os.environ.get(SITE_CONFIG_ENV)
    if site_cfg:
        cfg = cfg.with_overrides(json.loads(Path(site_cfg).read_text()))
    return cfg


def _test_corruption(flare_name: str) -> str | None:
    for item in filter(None, os.environ.get(TEST_CORRUPT_ENV, "").split(",")):
        name, _, fault = item.partition(":")
        if name == flare_name:
            return fault
    return None


def _corrupt(state: dict, meta: dict, fault: str) -> tuple[dict, dict]:
    import torch

    state, meta = dict(state), dict(meta)
    c = state["centroids"]
    if fault == "nan":
        state["centroids"] = torch.full_like(c, math.nan)
    elif fault == "extra_centroid":
        state["centroids"] = torch.cat([c, c[:1]], dim=0)
    elif fault == "bad_shape":
        key = next(k for k in state if k != "centroids")
        state[key] = torch.zeros(3, 3)
    elif fault == "leak":  # undeclared content that FussResultFilter must drop
        state["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
        meta["image_ids"] = ["secret_000"]
    else:
        raise ValueError(f"unknown test fault {fault!r}")
    return state, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FUSS FLARE client (Client API script)")
    parser.add_argument("--config", default=CONFIG_FILE, help="FussConfig JSON (relative: the app's custom folder)")
    args = parser.parse_args(argv)
    cfg = load_site_config(args.config)

    flare.init()
    name = flare.get_site_name()
    writer = SummaryWriter()
    site = None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if site is None:
            from fuss_components.site import Site

            site = Site(cfg, name)
        task = flare.get_task_name()
        if task == TASK_SITE_INFO:
            info = {
                "is_training_site": float(site.is_training_site),
                "is_validation_site": float(site.is_validation_site),
                "num_samples": float(site.num_samples if site.is_training_site else 0),
            }
            flare.send(flare.FLModel(metrics=info, meta={META_SITE: site.name}))
        elif flare.is_train():
            round_idx = int(model.current_round or 0)
            result = site.train(to_torch_state(model.params), round_idx)
            state = result.state
            metrics = {k: float(v) for k, v in result.metrics.items()}
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, global_step=round_idx)
            meta = {META_NUM_SAMPLES: int(result.num_samples), META_SITE: site.name}
            for one in filter(None, (_test_corruption(name) or "").split("+")):
                print(f"FUSS TEST HOOK: corrupting the update of {name} ({one})")
                state, meta = _corrupt(state, meta, one)
            flare.send(flare.FLModel(params=state, metrics=metrics, meta=meta))
        elif flare.is_evaluate():
            round_idx = int(model.current_round or 0)
            scores = site.validate(to_torch_state(model.params))
            out = {k: scores[k] for k in VALIDATION_METRICS if k in scores}
            out["per_class_iou"] = [float(v) for v in out.get("per_class_iou", [])]
            for key in ("miou", "pixel_acc", "clusters_used"):
                if key in out:
                    writer.add_scalar(f"val/{key}", float(out[key]), global_step=round_idx)
            flare.send(flare.FLModel(metrics=out, meta={META_SITE: site.name}))
        else:
            raise RuntimeError(f"FUSS site {name}: unknown task {task!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
