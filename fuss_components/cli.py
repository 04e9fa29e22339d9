"""The ``fuss`` command line: partition, extract, train, evaluate, predict, name-clusters, export, job.

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

from .config import EXPORT_FORMATS, ConfigError, FussConfig, parse_overrides

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
    p.add_argument("--strategy", choices=["preset", "site", "dirichlet", "iid"], default="preset",
                   help="preset: the config's partition; site: one client per site of the dataset (held-out "
                        "validation: --validation-sites / --validation-split; neither: sites whose images are all "
                        "in split test only validate); dirichlet / iid: --clients clients")
    p.add_argument("--clients", type=int, help="number of clients (dirichlet, iid, cityscapes preset)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--validation-sites", nargs="+", metavar="SITE", default=[],
                   help="site strategy: these sites only validate, on all their images")
    p.add_argument("--validation-split", metavar="SPLIT",
                   help="site strategy: every other site's images of this split (e.g. test) are held out; the site "
                        "validates on them and trains on the rest")
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
    p.add_argument("--out", required=True, help="folder for masks/, overlays/ (with a legend), areas.csv (pixel "
                   "fraction and count of every cluster per image) and predict.json (written, skipped, outputs)")

    p = sub.add_parser("name-clusters", help="store human names of the clusters in a model file")
    p.add_argument("--model", required=True, help="fuss_model.pt / model.pt / FL_global_model.pt")
    p.add_argument("--names", required=True,
                   help='JSON file: a list of all cluster names, or {"3": "polyp", ...} to name some of them')
    p.add_argument("--out", help="model file to write (default: rewrite --model in place)")
    p.set_defaults(config=None, set=None)  # needs no config; main still resolves one for every command

    p = sub.add_parser("export", help="write a deployable model: one TorchScript or ONNX file (image -> cluster ids) "
                                      "+ JSON")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="fuss_model.pt / model.pt / FL_global_model.pt")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="torchscript: fuss_segmenter.pt (torch.jit.load); onnx: fuss_segmenter.onnx (ONNX Runtime; "
                        "needs pip install -e '.[onnx]')")
    p.add_argument("--out", required=True, help="folder for fuss_segmenter.pt / .onnx and fuss_segmenter.json")

    p = sub.add_parser("job", help="export FLARE job folders (needs the fuss_flare layer)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments of `fuss job export ...`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, each on its own line
            if args.command == "job":
                from fuss_flare.job import main as job_main  # FLARE layer, imported only here

                return job_main(args.job_args)
            return COMMANDS[args.command](args, load_config(args))
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        # every progress bar is closed by now (context managers, loops over tqdm): the error gets its own line
        print(f"fuss: error: {err}", file=sys.stderr)
        return 2


def _outputs_line(command: str, out: Path) -> None:
    """The last line of a command: where its outputs are."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    log.info("fuss %s: outputs in %s: %s", command, out.resolve(), ", ".join(names))


def cmd_partition(args, cfg: FussConfig) -> int:
    from .partition import partition_dirichlet, partition_iid, partition_sites, partition_summary
    from .site import open_site_dataset, resolve_partition

    if args.strategy != "site" and (args.validation_sites or args.validation_split):
        raise ConfigError("--validation-sites and --validation-split belong to --strategy site")
    dataset = open_site_dataset(cfg)
    if args.strategy == "preset":
        spec = cfg.partition if args.clients is None else f"{cfg.partition}:{args.clients}"
        partition = resolve_partition(cfg.with_overrides({"partition": spec}), dataset)
    elif args.strategy == "site":
        partition = partition_sites(dataset, args.validation_sites, args.validation_split, cfg.federation.seed)
    elif args.strategy == "dirichlet":
        partition = partition_dirichlet(dataset, None, args.clients, args.alpha, cfg.federation.seed)
    else:
        partition = partition_iid(dataset, None, args.clients, cfg.federation.seed)
    partition.save(args.out)
    print(partition_summary(partition))
    print(f"wrote {args.out} (use it with --set partition={args.out})")
    return 0


def cmd_extract(args, cfg: FussConfig) -> int:
    from .paths import cache_dir
    from .site import Site, open_site_dataset, resolve_partition, site_order

    dataset = open_site_dataset(cfg)
    partition = resolve_partition(cfg, dataset)
    sites = [Site(cfg, name, partition, dataset) for name in args.sites or site_order(partition)]
    for site in sites:  # every site's files are checked before the first backbone pass
        site.check_data()
    extracted = {}
    for site in sites:
        extracted[site.name] = site.prepare()
        log.info("site %s: extracted %s (0 = already cached)", site.name, extracted[site.name])
    skipped = {site.name: site.skipped_images for site in sites if site.skipped_images}
    for name, images in skipped.items():
        log.warning("site %s: %d image(s) left out (data.on_bad_image='skip'): %s", name, len(images),
                    "; ".join(f"{i}: {reason}" for i, reason in images.items()))
    print(json.dumps({"extracted": extracted, "skipped_images": skipped, "cache_dir": str(cache_dir(cfg.cache_dir))}))
    log.info("fuss extract: features in %s", cache_dir(cfg.cache_dir).resolve())
    return 0


def cmd_train(args, cfg: FussConfig) -> int:
    from .runner import RUNNERS

    result = RUNNERS[args.mode](cfg, args.out, crf=args.crf)
    print(json.dumps({"mode": args.mode, "miou": result["miou"], "pixel_acc": result["pixel_acc"],
                      "skipped_images": result["skipped_images"], "out": args.out}))
    _outputs_line("train", Path(args.out))
    return 0


def _model_and_config(args, cfg: FussConfig):
    """(model state, config, cluster names) of ``--model``, read once: the file's own config unless ``--config``
    is given; ``--set`` applies to either."""
    from .checkpoint import read_model_file

    state, saved, names = read_model_file(args.model)
    if saved is not None and not args.config:  # the checkpoint knows its config; --set still applies
        cfg = FussConfig.from_dict(saved)
        overrides = parse_overrides(args.set)
        cfg = cfg.with_overrides(overrides) if overrides else cfg
    return state, cfg, names


def cmd_evaluate(args, cfg: FussConfig) -> int:
    from .runner import run_evaluate

    state, cfg, _ = _model_and_config(args, cfg)
    result = run_evaluate(cfg, state, args.out, crf=args.crf, overlays=args.overlays, model_path=args.model)
    print(json.dumps({"miou": result["miou"], "pixel_acc": result["pixel_acc"], **({"crf": result["crf"]}
                      if args.crf else {}), "skipped_images": result["skipped_images"]}))
    _outputs_line("evaluate", Path(args.out))
    return 0


def cmd_predict(args, cfg: FussConfig) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .backbones import load_backbone
    from .crf import dense_crf
    from .datasets import DataError, ImageFolderDataset
    from .evaluate import CRF_LOGIT_SCALE, image_logits
    from .export import cluster_names
    from .files import atomic_write, atomic_write_json
    from .names import area_row, write_areas_csv
    from .site import build_model
    from .trainer import resolve_device
    from .viz import overlay_with_legend

    def write_png(path: Path, array) -> None:
        atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))

    state, cfg, saved_names = _model_and_config(args, cfg)
    num_clusters = int(state["centroids"].shape[0])
    names = cluster_names(saved_names, num_clusters)
    images = ImageFolderDataset(args.images)  # the same reader (and ids) as a site's own image folder
    device = resolve_device(cfg.train.device)
    backbone = load_backbone(cfg.backbone, device)
    model = build_model(cfg, num_clusters)
    model.load_state_dict(state)
    model.to(device).eval()
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    areas, skipped = [], []
    # warnings go through tqdm.write, so they stand on their own line above the bar
    with logging_redirect_tqdm(), tqdm(images.ids(), desc="predict", unit="img") as bar:
        for image_id in bar:
            try:
                image = images.load_image(image_id)
            except DataError as err:
                if cfg.data.on_bad_image != "skip":
                    raise DataError(f"{err} (data.on_bad_image='fail'; --set data.on_bad_image=skip leaves such "
                                    f"images out and lists them in predict.json)") from err
                log.warning("skipping image %s: %s (data.on_bad_image='skip')", image_id, err)
                skipped.append({"image_id": image_id, "path": images.sample(image_id).extra["relative_path"],
                                "reason": str(err)})
                continue
            logits = image_logits(model, backbone, image, cfg.data.eval_short_side, cfg.data.eval_flip)
            if args.crf:
                mask = dense_crf(np.asarray(image), (logits * CRF_LOGIT_SCALE).numpy()).argmax(0)
            else:
                mask = logits.argmax(0).numpy()
            write_png(out / "masks" / f"{image_id}.png", mask.astype(np.uint8))
            write_png(out / "overlays" / f"{image_id}.png", overlay_with_legend(np.asarray(image), mask, names))
            areas.append(area_row(image_id, mask, num_clusters))
    write_areas_csv(out / "areas.csv", names, areas)
    cfg.save(out / "config.json")
    outputs = {"masks": "masks/<image id>.png (cluster ids)", "overlays": "overlays/<image id>.png (with legend)",
               "areas": "areas.csv", "config": "config.json"}
    atomic_write_json(out / "predict.json", {
        "model": str(args.model), "images": str(args.images), "crf": bool(args.crf), "cluster_names": names,
        "written": len(areas), "skipped": skipped, "outputs": outputs})
    print(f"fuss predict: {len(areas)} images segmented, {len(skipped)} skipped; masks, overlays and areas.csv "
          f"in {out} (summary: {out / 'predict.json'})")
    return 0


def cmd_name_clusters(args, cfg: FussConfig) -> int:
    from .names import name_clusters

    names = name_clusters(args.model, args.names, args.out)
    print(json.dumps({"model": args.out or args.model, "cluster_names": names}))
    return 0


def cmd_export(args, cfg: FussConfig) -> int:
    from .export import export_model

    _, cfg, _ = _model_and_config(args, cfg)  # a bad model file fails here, naming it; the config of `fuss predict`
    card = export_model(args.model, args.out, cfg, args.format)
    print(json.dumps({"out": args.out, "format": card["format"], "module_file": card["module_file"],
                      "num_clusters": card["num_clusters"]}))
    return 0


COMMANDS = {"partition": cmd_partition, "extract": cmd_extract, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "name-clusters": cmd_name_clusters, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
