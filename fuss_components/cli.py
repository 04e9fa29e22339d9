"""The ``fuss`` command line: partition, extract, train, evaluate, predict, bench, job.

Every subcommand takes ``--config FILE`` (JSON, see ``fuss_components.config``) and ``--set key=value``
overrides (dotted keys, JSON values), and writes its resolved config and metrics as JSON next to its outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, FussConfig

log = logging.getLogger("fuss")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings need no quotes: --set data.dataset=polyp


def set_overrides(args: argparse.Namespace) -> dict:
    """The ``--set key=value`` items as a dict of dotted keys to JSON values."""
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        overrides[key] = _parse_value(value)
    return overrides


def load_config(args: argparse.Namespace) -> FussConfig:
    """Config file (or defaults) plus ``--set`` overrides, validated before any work starts."""
    cfg = FussConfig.load(args.config) if args.config else FussConfig()
    overrides = set_overrides(args)
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
    p.add_argument("--images", required=True, help="folder of .jpg/.png images")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--out", required=True)

    p = sub.add_parser("bench", help="benchmarks that write their figures to files")
    bench = p.add_subparsers(dest="what", required=True)
    b = bench.add_parser("extract", help="feature-extraction throughput vs a bare backbone loop, peak RSS")
    _add_config_args(b)
    b.add_argument("--images", type=int, default=48, help="number of images")
    b.add_argument("--batch-images", type=int, default=4)
    b.add_argument("--out", required=True, help="JSON file for the figures")
    b = bench.add_parser("paper", help="the paper's Tables 1-3 through the FLARE simulator (fuss_components.paper)")
    _add_config_args(b)
    b.add_argument("--dataset", choices=["camvid", "polyp"], default="camvid")
    b.add_argument("--budget", choices=["full", "reduced"], default="full",
                   help="full: 10 rounds x 1 local epoch, CRF on every image; reduced: 3 rounds x 15 steps, "
                        "CRF on every 4th validation image (about an hour for camvid on 2 cores)")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (names as in the tables)")
    b.add_argument("--out", default="docs/results",
                   help="folder for paper_<dataset>[_<tag>]_<budget>.json / .md / _records.json (default %(default)s)")
    b.add_argument("--figures", default="docs/figures", help="folder for the PNG figures (default %(default)s)")
    b.add_argument("--work", default="runs/bench_paper", help="folder for jobs, workspaces and models")
    b.add_argument("--tag", default="", help="name of a variant (e.g. with --set train.objective=smooseg): "
                                             "results go to paper_<dataset>_<tag>_<budget>.*")
    b.add_argument("--verify", action="store_true",
                   help="run the recorded settings and seeds again in fresh folders and compare with the records "
                        "(writes paper_<dataset>[_<tag>]_<budget>_verify.json; the records are not changed)")
    b.add_argument("--tolerance", type=float, default=0.0,
                   help="with --verify: largest absolute difference (fraction, 1e-4 = 0.01 mIoU points) counted as the "
                        "same (default 0: bit-identical figures)")
    b = bench.add_parser("flare", help="FLARE simulator vs in-process federation: wall time, bytes, parity")
    _add_config_args(b)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--local-steps", type=int, help="default: one local epoch per round")
    b.add_argument("--threads-per-site", type=int, help="OMP_NUM_THREADS of the simulator's site processes")
    b.add_argument("--work", default="runs/bench_flare")
    b.add_argument("--out", required=True, help="JSON file for the figures")

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
        overrides = {k: _parse_value(v) for k, _, v in (s.partition("=") for s in args.set or [])}
        cfg = cfg.with_overrides(overrides) if overrides else cfg
    return state, cfg


def cmd_evaluate(args, cfg: FussConfig) -> int:
    from .runner import _Run, _finish, _summary

    state, cfg = _model_and_config(args, cfg)
    run = _Run(cfg)
    out = Path(args.out)
    final = run.validate(state, crf=args.crf, overlay_dir=out / "overlays", num_overlays=args.overlays)
    result = {"mode": "evaluate", "model": str(args.model), "final": final, **_summary(final)}
    if args.crf:
        result["crf"] = {k: sum(m["crf"][k] * m["num_images"] for m in final.values())
                         / sum(m["num_images"] for m in final.values()) for k in ("miou", "pixel_acc")}
    _finish(out, cfg, result)
    print(json.dumps({"miou": result["miou"], "pixel_acc": result["pixel_acc"], **({"crf": result["crf"]}
                      if args.crf else {})}))
    return 0


def cmd_predict(args, cfg: FussConfig) -> int:
    import numpy as np
    from PIL import Image

    from .backbones import load_backbone
    from .crf import dense_crf
    from .evaluate import CRF_LOGIT_SCALE
    from .site import build_model
    from .transforms import eval_view
    from .trainer import resolve_device
    from .viz import colorize, overlay
    import torch
    import torch.nn.functional as F

    state, cfg = _model_and_config(args, cfg)
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise FileNotFoundError(f"no .jpg/.png images in {args.images}")
    device = resolve_device(cfg.train.device)
    backbone = load_backbone(cfg.backbone, device)
    model = build_model(cfg, state["centroids"].shape[0])
    model.load_state_dict(state)
    model.to(device).eval()
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for path in images:
        try:
            image = Image.open(path).convert("RGB")
        except OSError as err:
            raise FileNotFoundError(f"cannot read image {path}: {err}") from err
        feats = backbone.features(eval_view(image, cfg.data.eval_short_side, backbone.patch_size)[None].to(device))
        logits = F.interpolate(model.cluster_logits(feats), size=image.size[::-1], mode="bilinear")[0].cpu()
        if args.crf:
            mask = dense_crf(np.asarray(image), (logits * CRF_LOGIT_SCALE).numpy()).argmax(0)
        else:
            mask = logits.argmax(0).numpy()
        Image.fromarray(mask.astype(np.uint8)).save(out / "masks" / f"{path.stem}.png")
        Image.fromarray(overlay(np.asarray(image), mask)).save(out / "overlays" / f"{path.stem}.png")
    cfg.save(out / "config.json")
    log.info("wrote %d masks (cluster ids) and overlays to %s", len(images), out)
    return 0


def cmd_bench(args, cfg: FussConfig) -> int:
    if args.what == "paper" and args.verify:
        from .paper import verify_paper

        checks = verify_paper(args.dataset, args.out, args.work, args.seeds, args.budget, args.only,
                              set_overrides(args), tag=args.tag, tolerance=args.tolerance)
        for c in checks:
            print(f"{c['setting']:<24} seed {c['seed']}: mIoU {100 * c['recorded']['miou']:.4f} recorded "
                  f"({c['recorded_commit']}), {100 * c['rerun']['miou']:.4f} now; max |diff| {c['max_abs_diff']:.2g}"
                  f" -> {'same' if c['same'] else 'DIFFERENT'}")
        return 0 if all(c["same"] for c in checks) else 1
    if args.what == "paper":
        from .paper import bench_paper, figures, overlay_grid, result_stem

        records = bench_paper(args.dataset, args.out, args.work, args.seeds, args.budget, args.only,
                              set_overrides(args), tag=args.tag)
        stem = result_stem(records[0]["dataset"], args.budget, args.tag)
        written = figures(Path(args.out) / f"paper_{stem}.json", args.figures, stem)
        grid = overlay_grid(args.work, stem, args.seeds[0],
                            ["raw-kmeans", "centralized", "FedAvg", "FedAvg+FedCC"], args.figures)
        print(Path(args.out, f"paper_{stem}.md").read_text())
        print("figures:", *[str(p) for p in written + ([grid] if grid else [])])
        return 0
    if args.what == "flare":
        from .paper import bench_flare

        result = bench_flare(args.out, args.work, args.rounds, args.local_steps, args.threads_per_site,
                             set_overrides(args))
        print(json.dumps(result, indent=2))
        return 0
    from .bench import bench_extract

    result = bench_extract(cfg, args.images, args.batch_images)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


COMMANDS = {"partition": cmd_partition, "extract": cmd_extract, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
