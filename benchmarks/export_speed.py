"""Size and speed of the deployable exports (`fuss export`) against `fuss predict`, measured in one run (ratios,
since these machines are noisy).

    python -m benchmarks.export_speed --images 20                     # -> docs/results/export_speed.json
    python -m benchmarks.export_speed --model runs/x/fuss_model.pt --images-dir photos/ --images 5 --out /tmp/e.json

The model: ``--model`` (under its saved config), or the initial model of ``--config`` (default: the built-in
defaults, the camvid setting); speed does not depend on training. The images: ``--images`` of ``--images-dir``, or
of the config's dataset spread over all its images. Every path runs on the CPU, decodes the same images and uses the
same thread count (ONNX Runtime gets torch's); seconds per image:

* ``predict_cli``: `fuss predict` as a command (model and backbone load, mask and overlay PNGs written);
* ``predict_eager``: predict's own computation, backbone loaded (decode, eval view, features, logits, upsampling,
  argmax);
* each export format: the loaded module, warm (its first pass, with the runtime's warm-up, reported apart),

plus the export seconds, the file size (MiB) and the fraction of pixels equal to `fuss predict`'s masks.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.paper import git_commit, run_command
from fuss_components.cli import main as fuss_main
from fuss_components.config import FussConfig, parse_overrides
from fuss_components.datasets import ImageFolderDataset, open_dataset
from fuss_components.checkpoint import read_model_file
from fuss_components.config import EXPORT_FORMATS
from fuss_components.export import MODULE_FILES, export_model
from fuss_components.files import atomic_write_json
from fuss_components.paths import data_root

DEFAULT_OUT = "docs/results/export_speed.json"


def pick_images(cfg: FussConfig, count: int, images_dir: str | None, into: Path) -> ImageFolderDataset:
    """``count`` images copied into the folder ``into`` (what `fuss predict` reads): the first of ``images_dir``,
    or the config's dataset's images spread evenly over all of them."""
    if images_dir:
        source = ImageFolderDataset(images_dir)
        ids = source.ids()[:count]
    else:
        source = open_dataset(cfg.data.dataset, data_root(cfg.data.root))
        every = source.ids()
        ids = every[::max(1, len(every) // count)][:count]
    into.mkdir(parents=True)
    for index, image_id in enumerate(ids):
        path = Path(source.sample(image_id).image_path)
        shutil.copyfile(path, into / f"{index:04d}_{path.name}")  # prefixed: names may repeat across folders
    return ImageFolderDataset(into)


def seconds_per_image(run_one: Callable[[str], object], ids: list[str]) -> tuple[float, float]:
    """(first pass, second pass) seconds per image of ``run_one(image_id)`` over ``ids``."""
    passes = []
    for _ in range(2):
        started = time.perf_counter()
        for image_id in ids:
            run_one(image_id)
        passes.append((time.perf_counter() - started) / len(ids))
    return passes[0], passes[1]


def predict_eager_runner(cfg: FussConfig, model: Path, images: ImageFolderDataset) -> Callable[[str], object]:
    """`fuss predict`'s computation for one image (no CRF, nothing written), backbone and head loaded."""
    from fuss_components.backbones import load_backbone
    from fuss_components.evaluate import image_logits
    from fuss_components.site import build_model

    state, _, _ = read_model_file(model)
    backbone = load_backbone(cfg.backbone, "cpu")
    head = build_model(cfg, state["centroids"].shape[0])
    head.load_state_dict(state)
    head.eval()

    def run_one(image_id: str) -> np.ndarray:
        image = images.load_image(image_id)
        return image_logits(head, backbone, image, cfg.data.eval_short_side, cfg.data.eval_flip).argmax(0).numpy()

    return run_one


def export_runner(fmt: str, path: Path, images: ImageFolderDataset) -> Callable[[str], np.ndarray]:
    """The exported file, loaded, called on one decoded image."""
    def rgb(image_id: str) -> np.ndarray:
        return np.asarray(images.load_image(image_id).convert("RGB"))

    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch's paths
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda image_id: session.run(None, {"image": rgb(image_id)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; loading is the point
        module = torch.jit.load(str(path))
    return lambda image_id: module(torch.from_numpy(rgb(image_id).copy())).numpy()


def agreement(run_one: Callable[[str], np.ndarray], images: ImageFolderDataset, masks: Path) -> float:
    """Fraction of pixels whose cluster id equals the mask `fuss predict` wrote."""
    same = total = 0
    for image_id in images.ids():
        labels, reference = run_one(image_id), np.asarray(Image.open(masks / f"{image_id}.png"))
        if labels.shape != reference.shape:
            raise RuntimeError(f"{image_id}: exported labels {labels.shape}, predict's mask {reference.shape}")
        same += int((labels == reference).sum())
        total += reference.size
    return same / total


def bench_export_speed(cfg: FussConfig, work: Path, count: int, model: str | None = None,
                       images_dir: str | None = None, formats: tuple[str, ...] = EXPORT_FORMATS) -> dict:
    """The figures of ``model`` (None: the initial model of ``cfg``) under ``cfg`` on ``count`` images; ``work``
    receives the model, the images, predict's output and the exports."""
    if count < 1:
        raise ValueError(f"--images must be at least 1, got {count}")
    if model is None:
        from fuss_components.checkpoint import save_model
        from fuss_components.site import init_global_state

        model_path = save_model(work / "fuss_model.pt", init_global_state(cfg), cfg)
    else:
        model_path = Path(model)
    images = pick_images(cfg, count, images_dir, work / "images")
    ids = images.ids()

    config_file = work / "config.json"
    cfg.save(config_file)
    started = time.perf_counter()
    if fuss_main(["predict", "--model", str(model_path), "--config", str(config_file), "--images",
                  str(images.root), "--out", str(work / "predict")]) != 0:
        raise RuntimeError(f"fuss predict failed on {images.root}")
    predict_cli = (time.perf_counter() - started) / len(ids)
    predict_eager = seconds_per_image(predict_eager_runner(cfg, model_path, images), ids)[1]

    per_format, card = {}, {}
    for fmt in formats:
        started = time.perf_counter()
        card = export_model(model_path, work / fmt, cfg, fmt)
        export_seconds = time.perf_counter() - started
        path = work / fmt / MODULE_FILES[fmt]
        run_one = export_runner(fmt, path, images)
        first, warm = seconds_per_image(run_one, ids)
        per_format[fmt] = {
            "export_seconds": export_seconds, "file_mib": path.stat().st_size / 2**20,
            "first_pass_seconds_per_image": first, "seconds_per_image": warm,
            "ratio_vs_predict_eager": warm / predict_eager, "ratio_vs_predict_cli": warm / predict_cli,
            "agreement_with_predict": agreement(run_one, images, work / "predict" / "masks"),
        }
    result = {
        "images": len(ids), "image_sizes_wh": sorted({images.image_size(i) for i in ids}),
        "threads": torch.get_num_threads(), "model": str(model) if model else "the config's initial model",
        "backbone": cfg.backbone.name,
        "block": card["backbone"]["block"], "eval_short_side": cfg.data.eval_short_side, "caveat": card["caveat"],
        "predict_cli_seconds_per_image": predict_cli, "predict_eager_seconds_per_image": predict_eager,
        **per_format,
        "torch_version": torch.__version__, "cpu": platform.processor() or platform.machine(), "commit": git_commit(),
    }
    if "onnx" in formats:
        import onnxruntime

        result["onnxruntime_version"] = onnxruntime.__version__
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_speed",
                                     description="Export size and speed against `fuss predict` (one JSON file).")
    parser.add_argument("--images", type=int, default=20, help="number of images (default 20)")
    parser.add_argument("--images-dir", help="folder of images (default: the config's dataset)")
    parser.add_argument("--model", help="fuss_model.pt to export (default: the config's initial model)")
    parser.add_argument("--config", help="JSON config file (default: built-in defaults = the camvid setting)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--formats", nargs="+", choices=EXPORT_FORMATS, default=list(EXPORT_FORMATS),
                        help="export formats to measure (default: all)")
    parser.add_argument("--work", help="folder for the temporary folder of the model, images, masks and exports "
                                       "(default: the system's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file for the figures (default {DEFAULT_OUT})")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    saved = read_model_file(args.model)[1] if args.model else None
    if saved is not None:  # the model's own config, as `fuss predict` and `fuss export` use it
        cfg = FussConfig.from_dict(saved)
    else:
        cfg = FussConfig.load(args.config) if args.config else FussConfig()
    # the exports run on the CPU, so predict does too
    cfg = cfg.with_overrides({**parse_overrides(args.set), "train.device": "cpu"})
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        result = bench_export_speed(cfg, Path(work), args.images, args.model, args.images_dir,
                                    tuple(args.formats))
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(get_args_parser(), main))
