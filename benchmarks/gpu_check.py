"""One short run that measures what a site's GPU does for FUSS, with no weights and no data needed: the paper's
backbone shapes (timm ``vit_base_patch8_224``, randomly initialised: DINO ViT-B/8's 768 channels and 28 x 28 tokens
a view) on synthetic 480 x 360 images written here.

Measured, on ``--device`` (``cuda`` on a GPU machine; ``cpu`` runs the same script as a rehearsal):

* extraction: images/s of the site cache (five training views an image), in float32 and with
  ``backbone.autocast = "bfloat16"``, with the GPU's utilisation sampled by ``nvidia-smi`` while it runs (where
  present) and the peak GPU memory of each part;
* training: steps/s of the real ``LocalTrainer`` (the difference of two rounds of different lengths, so the
  round's fixed part is excluded), in the configured precision;
* evaluation: images/s of ``Site.validate`` (whole-image features extracted, then scored);
* one two-site round (and a validation site) through the real ``nvflare simulator``, wall seconds.

Writes ``docs/results/gpu.json`` with the card's name (``torch.cuda.get_device_name``), torch and CUDA versions.
Timings mean something only beside the card they came from; a CPU rehearsal says ``"device": "cpu"``.

    python -m benchmarks.gpu_check --device cuda              # about 5 minutes on one GPU
    python -m benchmarks.gpu_check --device cpu --images 8 --steps 2 4 --out /tmp/gpu.json   # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
CLASSES = ["background", "red", "blue"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64, help="training images of each of the two sites")
    parser.add_argument("--validation-images", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 60], metavar=("SHORT", "LONG"))
    parser.add_argument("--backbone", default="vit_base_patch8_224")
    parser.add_argument("--block", type=int, default=None, help="feature block (default: the config's)")
    parser.add_argument("--dim", type=int, default=None, help="head width D (default: the config's, 70)")
    parser.add_argument("--no-simulator", action="store_true", help="skip the simulator round")
    parser.add_argument("--work", default=None, help="folder for data, cache and workspace (default: temporary)")
    parser.add_argument("--out", default=str(RESULTS / "gpu.json"))
    return parser


def write_dataset(root: Path, sites: dict[str, int], size=(360, 480), seed: int = 0) -> Path:
    """A dataset ``gpucheck`` in the folder layout (``meta.json``): grey noise with a red and a blue rectangle,
    labelled 1 and 2; site ``val`` is the validation split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ds = root / "gpucheck"
    h, w = size
    items = []
    for site, count in sites.items():
        split = "test" if site == "val" else "train"
        (ds / "images" / split).mkdir(parents=True, exist_ok=True)
        (ds / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            iid = f"{site}_{i:04d}"
            img = rng.normal(110, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
            lab = np.zeros((h, w), np.uint8)
            for cls, colour in ((1, (200, 30, 30)), (2, (30, 40, 210))):
                rh, rw = rng.integers(h // 4, h // 2), rng.integers(w // 4, w // 2)
                y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
                img[y:y + rh, x:x + rw] = colour
                lab[y:y + rh, x:x + rw] = cls
            Image.fromarray(img).save(ds / "images" / split / f"{iid}.jpg", quality=95)
            Image.fromarray(lab).save(ds / "labels" / split / f"{iid}.png")
            items.append({"id": iid, "split": split, "site": site, "width": w, "height": h})
    meta = {"name": "gpucheck", "classes": CLASSES, "num_classes": len(CLASSES), "ignore_index": 255,
            "count": len(items), "items": items}
    (ds / "meta.json").write_text(json.dumps(meta))
    return root


class Utilisation:
    """GPU utilisation (%) sampled by ``nvidia-smi`` every half second while in the ``with`` block."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._tool = shutil.which("nvidia-smi")

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run([self._tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        if self._tool:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict | None:
        return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples)),
                "samples": len(self.samples)} if self.samples else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(args: argparse.Namespace) -> dict:
    from fuss_components.config import FussConfig
    from fuss_components.files import atomic_write_json
    from fuss_components.partition import Partition
    from fuss_components.site import Site, init_global_state

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fuss_gpu_check_"))
    sites = {"s1": args.images, "s2": args.images, "val": args.validation_images}
    data = write_dataset(work / "data", sites)
    from fuss_components.datasets import open_dataset

    ds = open_dataset("gpucheck", data)
    partition = Partition("gpucheck", "site", 0, len(CLASSES), {s: ds.ids(site=s) for s in ("s1", "s2")},
                          {"val": ds.ids(site="val")}, {"note": "gpu check"})
    partition.save(work / "partition.json")
    cfg = FussConfig.from_dict({
        "backbone": {"name": args.backbone, "weights": "random",
                     **({} if args.block is None else {"block": args.block})},
        "data": {"dataset": "gpucheck", "root": str(data)},
        "train": {"device": args.device, "num_clusters": len(CLASSES),
                  **({} if args.dim is None else {"dim": args.dim})},
        "federation": {"rounds": 1},
        "partition": str(work / "partition.json"),
        "cache_dir": str(work / "cache"),
    })
    os.environ.setdefault("FUSS_SITE_POLICY", str(_permissive_policy(work)))
    report: dict = {"device": args.device, "backbone": f"{args.backbone} (random init, the paper's shapes)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
                    "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "images_a_site": args.images, "precision": cfg.train.precision}
    if args.device.startswith("cuda"):
        report["card"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    for key, variant in (("extraction", cfg), ("extraction_bf16_autocast",
                                                  cfg.with_overrides({"backbone.autocast": "bfloat16"}))):
        site = Site(variant, "s1")
        reset_peak(args.device)
        with Utilisation() as util:
            started = time.perf_counter()
            site.prepare(progress=False)
            sync(args.device)
            seconds = time.perf_counter() - started
        report[key] = {"images": args.images, "seconds": seconds, "images_per_second": args.images / seconds,
                       "batch_images": variant.data.extract_batch, "gpu_utilisation_percent": util.summary(),
                       **peak(args.device)}
        print(f"{key}: {args.images / seconds:.1f} images/s", flush=True)
    site = Site(cfg, "s1")

    trainer = site.trainer
    state = init_global_state(cfg)
    trainer.train(state, 0, steps=2)  # warm-up: kernels, allocator
    reset_peak(args.device)
    rounds = {}
    with Utilisation() as util:
        for steps in args.steps:
            sync(args.device)
            started = time.perf_counter()
            result = trainer.train(state, 0, steps=steps)
            sync(args.device)
            rounds[steps] = time.perf_counter() - started
    short, long = args.steps
    step = (rounds[long] - rounds[short]) / (long - short)
    report["training"] = {"round_seconds": {str(k): v for k, v in rounds.items()}, "seconds_per_step": step,
                          "steps_per_second": 1 / step, "gpu_utilisation_percent": util.summary()}
    report["training"].update(peak(args.device))  # with the site's views on the GPU when they fit
    print(f"training: {1 / step:.2f} steps/s", flush=True)

    val = Site(cfg, "val")
    reset_peak(args.device)
    with Utilisation() as util:
        started = time.perf_counter()
        metrics = val.validate(result.state)
        sync(args.device)
        seconds = time.perf_counter() - started
    report["evaluation"] = {"images": args.validation_images, "seconds": seconds,
                            "images_per_second": args.validation_images / seconds, "miou": metrics["miou"],
                            "gpu_utilisation_percent": util.summary(), **peak(args.device)}
    print(f"evaluation (extraction included): {args.validation_images / seconds:.1f} images/s", flush=True)

    if not args.no_simulator:
        report["simulator"] = simulator_round(cfg, work)
        print(f"simulator round: rc {report['simulator']['returncode']}, {report['simulator']['seconds']:.0f} s",
              flush=True)
    atomic_write_json(Path(args.out), report)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> dict:
    """The GPU memory the measured part allocated at most (what a site's ``site_gpu_memory_gb`` must cover)."""
    return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30} if device.startswith("cuda") else {}


def _permissive_policy(work: Path) -> Path:
    """The check's sites hold a few dozen synthetic images: below a hospital's disclosure defaults."""
    path = work / "fuss_policy.json"
    path.write_text(json.dumps({"min_images": 1, "min_validation_images": 1, "min_support_codes": 1,
                                "min_support_images": 1}))
    return path


def simulator_round(cfg, work: Path) -> dict:
    """One round of the two sites and the validation site through ``nvflare simulator`` (warm cache)."""
    from benchmarks.simulator import run_simulator
    from fuss_flare.job import main as job_main

    cfg_file = work / "gpu_check.json"
    cfg.save(cfg_file)
    assert job_main(["export", "--config", str(cfg_file), "--out", str(work / "jobs"), "--name", "gpu_check"]) == 0
    run = run_simulator(work / "jobs" / "gpu_check", work / "ws", timeout=900)
    return {"returncode": run.returncode, "seconds": run.seconds, "restarts": run.restarts,
            "tail": run.output[-1500:] if run.returncode else ""}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
