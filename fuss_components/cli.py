"""The ``fuss`` command line: partition, extract, train, evaluate, predict, export, job.

Every subcommand takes ``--config FILE`` (JSON, see ``fuss_components.config``) and ``--set key=value``
overrides (dotted keys, JSON values), and writes its resolved config and metrics as JSON next to its outputs.
Benchmarks are not subcommands: they are ``python -m benchmarks.<name>`` scripts of the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, FussConfig, parse_overrides

log = logging.getLogger("fuss")


def load_config(args: argparse.Namespace) -> FussConfig:
    """Config file (or defaults) plus ``--set`` overrides, validated before any work starts."""
    cfg = FussConfig.load(args.config) if args.config else FussConfig()
    overrides = parse_overrides(args.set)
    return cfg.with_overrides(overrides) if overrides else cfg


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON config file (default: built-in defaults = the camvid setting)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set federation.rounds=3 (repeatable)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuss", description="Federated Unsupervised Semantic Segmentation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("partition", help="write a partition manifest (site -> image ids)")
    _add_config_args(p)
    p.add_argument("--strategy", choices=["preset", "dirichlet", "iid"], default="preset")
    p.add_argument("--clients", type=int, help="number of clients (dirichlet, iid, cityscapes preset)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--out", required=True, help="manifest JSON to write")

    p = sub.add_parser("extract", help="build the feature cache of every site of the partition")
    _add_config_args(p)
    p.add_argument("--sites", nargs="*", help="only these sites")

    p = sub.add_parser("train", help="train in one process: local, centralized, federated or raw-kmeans")
    _add_config_args(p)
    p.add_argument("--mode", choices=["local", "centralized", "federated", "raw-kmeans"], required=True)
    p.add_argument("--crf", action="store_true", help="also report the final metrics after dense CRF")
    p.add_argument("--out", required=True, help="output folder (model.pt, metrics.json, config.json)")

    p = sub.add_parser("evaluate", help="evaluate a saved model on the validation sites")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="model.pt of `fuss train` or FLARE's FL_global_model.pt")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--overlays", type=int, default=0, help="save this many overlay PNGs per site")
    p.add_argument("--out", required=True)

    p = sub.add_parser("predict", help="segment a folder of images into masks and overlays")
    _add_config_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True,
                   help="folder of images, searched recursively (.jpg .jpeg .png .tif .tiff .bmp and DICOM)")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--out", required=True)

    p = sub.add_parser("export", help="write a deployable model: one TorchScript file (image -> cluster ids) + JSON")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="fuss_model.pt / model.pt / FL_global_model.pt")
    p.add_argument("--format", choices=["torchscript"], default="torchscript")
    p.add_argument("--out", required=True, help="folder for fuss_segmenter.pt and fuss_segmenter.json")

    p = sub.add_parser("job", help="export FLARE job folders (needs the fuss_flare layer)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments of `fuss job export ...`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "job":
            from fuss_flare.job import main as job_main  # FLARE layer, imported only here

            return job_main(args.job_args)
        return COMMANDS[args.command](args, load_config(args))
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"fuss: error: {err}", file=sys.stderr)
        return 2


def cmd_partition(args, cfg: FussConfig) -> int:
    from .partition import partition_dirichlet, partition_iid
    from .site import open_site_dataset, resolve_partition

    dataset = open_site_dataset(cfg)
    if args.strategy == "preset":
        spec = cfg.partition if args.clients is None else f"{cfg.partition}:{args.clients}"
        partition = resolve_partition(cfg.with_overrides({"partition": spec}), dataset)
    elif args.strategy == "dirichlet":
        partition = partition_dirichlet(dataset, None, args.clients, args.alpha, cfg.federation.seed)
    else:
        partition = partition_iid(dataset, None, args.clients, cfg.federation.seed)
    partition.save(args.out)
    log.info("wrote %s: %s", args.out, partition.sizes())
    return 0


def cmd_extract(args, cfg: FussConfig) -> int:
    from .site import Site, open_site_dataset, resolve_partition, site_order

    dataset = open_site_dataset(cfg)
    partition = resolve_partition(cfg, dataset)
    for name in args.sites or site_order(partition):
        counts = Site(cfg, name, partition, dataset).prepare()
        log.info("site %s: extracted %s (0 = already cached)", name, counts)
    return 0


def cmd_train(args, cfg: FussConfig) -> int:
    from .runner import RUNNERS

    result = RUNNERS[args.mode](cfg, args.out, crf=args.crf)
    print(json.dumps({"mode": args.mode, "miou": result["miou"], "pixel_acc": result["pixel_acc"],
                      "out": args.out}))
    return 0


def _model_and_config(args, cfg: FussConfig):
    from .runner import load_model

    state, saved = load_model(args.model)
    if saved is not None and not args.config:  # the checkpoint knows its config; --set still applies
        cfg = FussConfig.from_dict(saved)
        overrides = parse_overrides(args.set)
        cfg = cfg.with_overrides(overrides) if overrides else cfg
    return state, cfg


def cmd_evaluate(args, cfg: FussConfig) -> int:
    from .metrics import image_weighted_mean
    from .runner import _Run, _finish, _summary

    state, cfg = _model_and_config(args, cfg)
    run = _Run(cfg)
    run.dataset.require_labels("fuss evaluate")
    out = Path(args.out)
    final = run.validate(state, crf=args.crf, overlay_dir=out / "overlays", num_overlays=args.overlays)
    result = {"mode": "evaluate", "model": str(args.model), "final": final, **_summary(final)}
    if args.crf:
        result["crf"] = image_weighted_mean({name: m["crf"] | {"num_images": m["num_images"]}
                                             for name, m in final.items()})
    _finish(out, cfg, result)
    print(json.dumps({"miou": result["miou"], "pixel_acc": result["pixel_acc"], **({"crf": result["crf"]}
                      if args.crf else {})}))
    return 0


def cmd_predict(args, cfg: FussConfig) -> int:
    import numpy as np
    from PIL import Image

    from .backbones import load_backbone
    from .crf import dense_crf
    from .datasets import DataError, ImageFolderDataset
    from .evaluate import CRF_LOGIT_SCALE
    from .site import build_model
    from .transforms import eval_view
    from .trainer import resolve_device
    from .viz import overlay
    import torch.nn.functional as F

    state, cfg = _model_and_config(args, cfg)
    images = ImageFolderDataset(args.images)  # the same reader (and ids) as a site's own image folder
    device = resolve_device(cfg.train.device)
    backbone = load_backbone(cfg.backbone, device)
    model = build_model(cfg, state["centroids"].shape[0])
    model.load_state_dict(state)
    model.to(device).eval()
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    written = 0
    for image_id in images.ids():
        try:
            image = images.load_image(image_id)
        except DataError as err:
            if cfg.data.on_bad_image != "skip":
                raise
            log.warning("skipping image %s: %s (data.on_bad_image='skip')", image_id, err)
            continue
        feats = backbone.features(eval_view(image, cfg.data.eval_short_side, backbone.patch_size)[None].to(device))
        logits = F.interpolate(model.cluster_logits(feats), size=image.size[::-1], mode="bilinear")[0].cpu()
        if args.crf:
            mask = dense_crf(np.asarray(image), (logits * CRF_LOGIT_SCALE).numpy()).argmax(0)
        else:
            mask = logits.argmax(0).numpy()
        Image.fromarray(mask.astype(np.uint8)).save(out / "masks" / f"{image_id}.png")
        Image.fromarray(overlay(np.asarray(image), mask)).save(out / "overlays" / f"{image_id}.png")
        written += 1
    cfg.save(out / "config.json")
    log.info("wrote %d masks (cluster ids) and overlays to %s", written, out)
    return 0


def cmd_export(args, cfg: FussConfig) -> int:
    from .export import export_model, read_model_file

    read_model_file(args.model)  # a missing or unreadable model file: an error naming it, before any work
    _, cfg = _model_and_config(args, cfg)  # the same config as `fuss predict` would use
    card = export_model(args.model, args.out, cfg, args.format)
    print(json.dumps({"out": args.out, "module_file": card["module_file"], "num_clusters": card["num_clusters"]}))
    return 0


COMMANDS = {"partition": cmd_partition, "extract": cmd_extract, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
