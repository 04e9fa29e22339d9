"""Label-free per-image foreground priors on polyp, scored on the development split (a negative result, kept).

For "find the small thing" tasks a per-image foreground/background split is the natural alternative to dataset
clusters. Two classic label-free rules on one block's tokens (whole image, ``data.eval_short_side``): the sign of
the first principal component, and a normalised cut of the thresholded cosine affinity (TokenCut-style); in both
the side that touches the image border less is called foreground (boundary prior). Hungarian-matched mIoU on the
dev images (``benchmarks.quality.splits``; the test lists are never read) -> ``docs/results/quality_foreground_<dataset>.json``.

    python -m benchmarks.quality_foreground --dataset polyp --blocks 6 8 11
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.quality import RESULTS, splits
from fuss_components.backbones import load_backbone
from fuss_components.config import FussConfig
from fuss_components.files import atomic_write_json
from fuss_components.metrics import ConfusionMatrix
from fuss_components.site import open_site_dataset
from fuss_components.transforms import eval_view


def border_mask(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0] = mask[-1] = True
    mask[:, 0] = mask[:, -1] = True
    return mask.flatten()


def principal_component_split(x: torch.Tensor, border: torch.Tensor) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    p = u[:, 0] if u[border, 0].mean() <= u[:, 0].mean() else -u[:, 0]
    return p > 0


def normalised_cut(x: torch.Tensor, border: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    xn = F.normalize(x, dim=1)
    affinity = (xn @ xn.T > tau).float() + 1e-5
    degree = affinity.sum(1)
    scale = torch.diag(degree ** -0.5)
    _, vectors = torch.linalg.eigh(scale @ (torch.diag(degree) - affinity) @ scale)
    fiedler = scale @ vectors[:, 1]
    side = fiedler > fiedler.mean()
    return ~side if side[border].float().mean() > side.float().mean() else side


RULES = {"pca": principal_component_split, "ncut": normalised_cut}


def main(args) -> None:
    cfg = FussConfig().with_overrides({"data.dataset": args.dataset, "partition": "site"})
    ds = open_site_dataset(cfg)
    backbone = load_backbone(cfg.backbone)
    cms = {(b, r): ConfusionMatrix(2, ds.num_classes) for b in args.blocks for r in RULES}
    for image_id in tqdm(splits(cfg, ds)["dev"], desc="dev", unit="img"):
        label = ds.load_label(image_id)
        with torch.no_grad():
            feats = backbone.model.forward_intermediates(
                eval_view(ds.load_image(image_id), cfg.data.eval_short_side, backbone.patch_size)[None],
                indices=args.blocks, norm=True, output_fmt="NCHW", intermediates_only=True)
        for block, f in zip(args.blocks, feats):
            _, h, w = f[0].shape
            x = f[0].flatten(1).T
            for name, rule in RULES.items():
                mask = rule(x, border_mask(h, w)).float().reshape(1, 1, h, w)
                up = F.interpolate(mask, size=label.shape, mode="bilinear", align_corners=False)[0, 0] > 0.5
                cms[(block, name)].update(up.long().numpy(), label)
    results = []
    for (block, name), cm in cms.items():
        r = cm.compute()
        results.append({"block": block, "rule": name, "miou": r["miou"], "per_class_iou": r["per_class_iou"],
                        "assignment": r["assignment"]})
        print(f"block {block:2d} {name:5s} mIoU {100 * r['miou']:.2f} per class "
              + " ".join(f"{100 * v:.1f}" for v in r["per_class_iou"]))
    out = Path(args.out or RESULTS) / f"quality_foreground_{args.dataset}.json"
    atomic_write_json(out, {"dataset": args.dataset, "split": "dev", "classes": ds.classes, "results": results},
                      indent=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="polyp")
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 8, 11])
    p.add_argument("--out")
    return p


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(get_args_parser().parse_args())
