"""Which backbone block (or concatenation of blocks) gives the best raw features, scored on the development split.

One forward pass per image yields every block's patch tokens (whole image, ``data.eval_short_side``); k-means on a
sample of training-image tokens, Hungarian-matched mIoU on the dev images (``benchmarks.quality.splits``; the test
set is never read). A screen for ``backbone.block``: the chosen block is then trained and scored with
``benchmarks.quality``. Results go to ``docs/results/quality_blocks_<dataset>.json``.

    python -m benchmarks.quality_blocks --dataset camvid --train-images 150
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.quality import RESULTS, Scorer, kmeans_centroids, splits
from fuss_components.backbones import load_backbone
from fuss_components.config import FussConfig, parse_overrides
from fuss_components.files import atomic_write_json
from fuss_components.site import num_clusters, open_site_dataset
from fuss_components.transforms import eval_view


KINDS = ("tokens", "keys", "values", "queries")


@torch.no_grad()
def all_blocks(backbone, ds, ids, short_side: int, kind: str = "tokens") -> list[torch.Tensor]:
    """Per image: ``(blocks, D', h, w)`` float16 features of every block: the patch tokens after the final norm,
    or the attention keys / values / queries of the block (heads concatenated; from its qkv projection)."""
    out = []
    vit = backbone.model
    indices = list(range(len(vit.blocks)))
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if kind != "tokens":
        which = {"queries": 0, "keys": 1, "values": 2}[kind]
        for i, blk in enumerate(vit.blocks):
            def grab(module, inputs, output, i=i):
                captured[i] = output.chunk(3, dim=-1)[which][:, vit.num_prefix_tokens:]
            hooks.append(blk.attn.qkv.register_forward_hook(grab))
    try:
        for image_id in tqdm(ids, desc=f"forward ({kind})", unit="img"):
            view = eval_view(ds.load_image(image_id), short_side, backbone.patch_size)[None]
            feats = vit.forward_intermediates(view, indices=indices, norm=True, output_fmt="NCHW",
                                              intermediates_only=True)
            if kind != "tokens":
                h, w = feats[0].shape[-2:]
                feats = [captured[i].transpose(1, 2).reshape(1, -1, h, w) for i in indices]
            out.append(torch.cat(feats).half())
    finally:
        for hook in hooks:
            hook.remove()
    return out


def main(args) -> None:
    cfg = FussConfig().with_overrides({"data.dataset": args.dataset, "partition": "site", **parse_overrides(args.set)})
    ds = open_site_dataset(cfg)
    split = splits(cfg, ds)
    k = num_clusters(cfg, ds)
    backbone = load_backbone(cfg.backbone)
    train_ids = sorted(random.Random(0).sample(split["train"], min(args.train_images, len(split["train"]))))
    started = time.perf_counter()
    train = all_blocks(backbone, ds, train_ids, cfg.data.eval_short_side, args.kind)
    dev = all_blocks(backbone, ds, split["dev"], cfg.data.eval_short_side, args.kind)
    forward_s = time.perf_counter() - started
    labels = [ds.load_label(i) for i in split["dev"]]
    singles = args.blocks if args.blocks is not None else range(len(backbone.model.blocks))
    candidates = [[b] for b in singles] + [list(map(int, c.split("+"))) for c in args.concat]
    if args.center:  # subtract each block's mean training token before the cosine (label-free)
        means = torch.stack([f.float().mean(dim=(2, 3)) for f in train]).mean(0)[:, :, None, None]
        train = [(f.float() - means).half() for f in train]
        dev = [(f.float() - means).half() for f in dev]
    results = []
    for blocks in candidates:
        def pick(f):  # concatenation of L2-normalised blocks: each block weighs the same in the cosine
            return torch.cat([F.normalize(f[b].float(), dim=0) for b in blocks])
        gen = torch.Generator().manual_seed(0)
        vectors = []
        for f in train:
            v = pick(f).flatten(1).T
            vectors.append(v[torch.randint(len(v), (args.per_image,), generator=gen)])
        vectors = F.normalize(torch.cat(vectors), dim=1)
        scorer = Scorer({"kmeans": kmeans_centroids(vectors, k, 0), "over2x": kmeans_centroids(vectors, 2 * k, 0)},
                        ds.num_classes, "logits")
        for f, label in zip(dev, labels):
            scorer.add(pick(f), label)
        scores = scorer.results()
        results.append({"blocks": blocks, "scores": scores})
        print(f"blocks {'+'.join(map(str, blocks)):8s} kmeans {100 * scores['kmeans']['miou']:.2f} "
              f"over2x {100 * scores['over2x']['miou']:.2f}  per class "
              + " ".join(f"{100 * v:.0f}" for v in scores["kmeans"]["per_class_iou"]), flush=True)
    suffix = ("" if args.kind == "tokens" else f"_{args.kind}") + ("_centered" if args.center else "")
    out = Path(args.out or RESULTS) / f"quality_blocks_{args.dataset}{suffix}.json"
    atomic_write_json(out, {"dataset": args.dataset, "split": "dev", "train_images": len(train_ids),
                            "dev_images": len(split["dev"]), "eval_short_side": cfg.data.eval_short_side,
                            "kind": args.kind, "centered": args.center, "forward_seconds": forward_s, "classes": ds.classes,
                            "results": results}, indent=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--train-images", type=int, default=150)
    p.add_argument("--per-image", type=int, default=400, help="token vectors per training image for k-means")
    p.add_argument("--concat", nargs="*", default=["7+8", "8+11", "6+8+10", "8+9"])
    p.add_argument("--blocks", type=int, nargs="*", help="single blocks to score (default: all)")
    p.add_argument("--center", action="store_true", help="centre each block's tokens on the training mean")
    p.add_argument("--kind", default="tokens", choices=KINDS, help="patch tokens or the attention's keys / values")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--out")
    return p


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(get_args_parser().parse_args())
