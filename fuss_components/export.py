"""A deployable model: one self-contained file that turns an image into cluster ids (TorchScript ``.pt`` or ONNX
``.onnx``), plus a JSON card beside it.

The module reproduces ``fuss predict`` without CRF, step by step: ImageNet normalisation of the RGB image, the
whole-image evaluation resize (short side -> ``data.eval_short_side``, both sides rounded to multiples of the patch
size, bilinear with antialias), the backbone's patch tokens of block ``backbone.block`` after the final norm, the
projection head, cosine similarity to the centroids, bilinear upsampling of those logits to the input size and the
argmax. Only the backbone blocks up to the used one are kept.

TorchScript (``fuss_segmenter.pt``). Input: a ``uint8`` tensor ``(H, W, 3)`` in RGB order, e.g.
``torch.from_numpy(np.asarray(pil_image.convert("RGB")))`` (the array ``fuss predict`` starts from). Any size works:
the resize happens inside the module. Output: an ``int64`` tensor ``(H, W)`` of cluster ids. One image per call;
the module runs on the device its tensors are moved to (``torch.jit.load(path, map_location=...)``).

ONNX (``fuss_segmenter.onnx``, opset 18, weights inside the file). The same contract as far as ONNX goes: input
``image``, a ``uint8`` array ``(H, W, 3)`` with dynamic H and W; output ``labels``, ``int64`` ``(H, W)``; the
backbone size is computed and the resize done inside the graph (ONNX ``Resize`` with antialias). Differences: a
wrong dtype or shape is refused by the runtime (its own error, not this module's message); there is no
``eval_size`` method (the card's ``preprocessing`` states the rule); the image is always resized, also when it
already has the backbone size (then the resize is the identity).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from .backbones import RANDOM_WEIGHTS, TIMM_WEIGHTS, Backbone, backbone_caveat, load_backbone, weights_sha256
from .checkpoint import read_model_file
from .config import EXPORT_FORMATS, FussConfig
from .files import atomic_write, atomic_write_bytes, atomic_write_json, sha256_file
from .paths import backbone_weights
from .transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

MODULE_FILE = "fuss_segmenter.pt"
ONNX_FILE = "fuss_segmenter.onnx"
MODULE_FILES = {"torchscript": MODULE_FILE, "onnx": ONNX_FILE}
CARD_FILE = "fuss_segmenter.json"
ONNX_INPUT, ONNX_OUTPUT = "image", "labels"
ONNX_OPSET = 18  # the first opset whose Resize has antialias, which the in-graph resize needs
EIGHT_BIT = "16-bit or float grey images mapped to 0..255 by their own min..max first, as `fuss predict` does"
INPUT_SPEC = f"uint8 tensor (H, W, 3), RGB, any size (resized inside the module as `fuss predict` does); {EIGHT_BIT}"
OUTPUT_SPEC = "int64 tensor (H, W): the cluster id of every pixel"
ONNX_INPUT_SPEC = (f"'{ONNX_INPUT}': uint8 array (H, W, 3), RGB, dynamic H and W (resized inside the graph as "
                   f"`fuss predict` does); {EIGHT_BIT}")
ONNX_OUTPUT_SPEC = f"'{ONNX_OUTPUT}': int64 array (H, W): the cluster id of every pixel"
RESIZE_RULE = ("short side -> eval_short_side, aspect kept, each side rounded (half to even) to a multiple of the "
               "patch size and at least one patch; bilinear with antialias on the normalised float image")


class ExportError(ValueError):
    """The model file cannot be exported; the message names the file."""


class SegmenterModule(nn.Module):
    """uint8 ``(H, W, 3)`` image -> int64 ``(H, W)`` cluster ids; the ``fuss predict`` path without CRF."""

    def __init__(self, backbone: Backbone, head: nn.Module, centroids: torch.Tensor, eval_short_side: int,
                 eval_flip: bool = False):
        super().__init__()
        vit = copy.deepcopy(backbone.model)
        self.patch_embed = vit.patch_embed
        self.norm_pre = vit.norm_pre
        self.blocks = nn.Sequential(*list(vit.blocks)[:backbone.block + 1])  # the later blocks are never used
        self.norm = vit.norm
        self.pos_embed = _PositionEmbedding(vit)
        self.head = copy.deepcopy(head)
        # backbone.project_dim: the channels the head reads (an empty matrix when it reads them all)
        self.projected = backbone.projection is not None
        self.register_buffer("projection", backbone.projection.clone() if self.projected else torch.zeros(0, 0))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1))
        # normalised once here; predict normalises the same tensor the same way at every call
        self.register_buffer("unit_centroids", F.normalize(centroids.detach().float(), dim=1))
        self.eval_short_side = int(eval_short_side)
        self.eval_flip = bool(eval_flip)  # average the scores of the image and of its mirror image (as predict)
        self.patch = int(backbone.patch_size)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.eval().requires_grad_(False)

    @torch.jit.export
    def eval_size(self, height: int, width: int) -> tuple[int, int]:
        """The backbone input size of an image: ``transforms.eval_size`` (TorchScript's ``round`` rounds half to
        even, like Python's). Exported, so a deployment can ask which size the backbone sees."""
        scale = self.eval_short_side / min(height, width)
        patch = self.patch
        return (max(patch, int(round(height * scale / patch)) * patch),
                max(patch, int(round(width * scale / patch)) * patch))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            height, width = image.size(0), image.size(1)
            pixels = self._normalised(image)
            view_h, view_w = self.eval_size(height, width)
            if view_h != height or view_w != width:
                pixels = F.interpolate(pixels, size=[view_h, view_w], mode="bilinear", align_corners=False,
                                       antialias=True)
            return self._labels(pixels, height, width, view_h, view_w)

    def _normalised(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, 3, H, W)`` float: the same ops as ``transforms.eval_view`` before its resize."""
        if image.dim() != 3 or image.size(2) != 3 or image.dtype != torch.uint8:
            raise ValueError("expected a uint8 tensor of shape (H, W, 3) in RGB order")
        pixels = image.permute(2, 0, 1).to(torch.float32).mul_(1.0 / 255)
        return pixels.sub_(self.mean).div_(self.std).unsqueeze(0)

    def _labels(self, pixels: torch.Tensor, height: int, width: int, view_h: int, view_w: int) -> torch.Tensor:
        """Cluster ids ``(height, width)`` of the resized image ``pixels`` ``(1, 3, view_h, view_w)``."""
        views = 1
        if self.eval_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            views = 2
        tokens = self.norm_pre(self.pos_embed(self.patch_embed(pixels)))
        tokens = self.norm(self.blocks(tokens))[:, self.num_prefix_tokens:]
        if self.projected:
            tokens = tokens @ self.projection
        feats = tokens.reshape(views, view_h // self.patch, view_w // self.patch, -1).permute(0, 3, 1, 2)
        if self.eval_flip:
            feats = torch.stack([feats[0], feats[1].flip(-1)])  # the mirror view's features, mirrored back
        code = F.normalize(self.head(feats.contiguous()), dim=1)
        logits = torch.einsum("bdhw,cd->bchw", code, self.unit_centroids).mean(0, keepdim=True)
        logits = F.interpolate(logits, size=[height, width], mode="bilinear", align_corners=False)
        return logits[0].argmax(0)


class OnnxSegmenterModule(SegmenterModule):
    """``SegmenterModule`` written for ``torch.onnx``'s exporter (``torch.export``), whose graph keeps H and W
    dynamic: the backbone size comes from ``symbolic_eval_size`` and the image is always resized, so the graph
    holds no branch on the example's size. In eager mode it computes what ``SegmenterModule`` does."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.size(0), image.size(1)
        view_h, view_w = symbolic_eval_size(height, width, self.eval_short_side, self.patch)
        pixels = F.interpolate(self._normalised(image), size=[view_h, view_w], mode="bilinear",
                               align_corners=False, antialias=True)
        return self._labels(pixels, height, width, view_h, view_w)


def symbolic_eval_size(height, width, short_side: int, patch: int):
    """``transforms.eval_size`` on the (symbolic) sizes ``torch.export`` traces: ``torch.sym_min`` /
    ``torch.sym_max`` instead of Python's ``min`` / ``max``, which would fix the graph to the example's
    orientation. On ints it returns what ``eval_size`` returns."""
    scale = short_side / torch.sym_min(height, width)
    return (torch.sym_max(patch, round(height * scale / patch) * patch),
            torch.sym_max(patch, round(width * scale / patch) * patch))


class _PositionEmbedding(nn.Module):
    """The ViT's prefix tokens and position embedding, resampled to the token grid of each input: timm's
    ``_pos_embed`` of a ``dynamic_img_size`` ViT, as a module of its own so the rest of the ViT can be left out."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        if not getattr(vit, "dynamic_img_size", False):
            raise ExportError("the backbone must be created with dynamic_img_size=True (load_backbone does)")
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.grid_size: list[int] = [int(s) for s in vit.patch_embed.grid_size]
        self.num_prefix_tokens = 0 if vit.no_embed_class else int(vit.num_prefix_tokens)
        self.no_embed_class = bool(vit.no_embed_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_h, grid_w, channels = x.shape
        to_cat: list[torch.Tensor] = []
        cls_token = self.cls_token
        if cls_token is not None:
            to_cat.append(cls_token.expand(batch, -1, -1))
        reg_token = self.reg_token
        if reg_token is not None:
            to_cat.append(reg_token.expand(batch, -1, -1))
        x = x.view(batch, -1, channels)
        pos_embed = self.pos_embed
        if pos_embed is None:
            return torch.cat(to_cat + [x], dim=1)
        pos_embed = resample_abs_pos_embed(pos_embed, new_size=[grid_h, grid_w], old_size=self.grid_size,
                                           num_prefix_tokens=self.num_prefix_tokens)
        if self.no_embed_class:
            x = x + pos_embed
            if len(to_cat) > 0:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if len(to_cat) > 0:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + pos_embed
        return self.pos_drop(x)


def cluster_names(saved: Any, count: int) -> list[str]:
    """The model's own cluster names when it carries one per cluster, else ``cluster 0`` .. ``cluster C-1``."""
    if isinstance(saved, (list, tuple)) and len(saved) == count and all(isinstance(n, str) for n in saved):
        return list(saved)
    return [f"cluster {i}" for i in range(count)]


def build_segmenter(state: dict[str, torch.Tensor], cfg: FussConfig,
                    module: type[SegmenterModule] = SegmenterModule) -> tuple[SegmenterModule, Backbone]:
    """The eager ``module`` (CPU) of a model state under its config, and the backbone it was built from."""
    from .site import build_model  # site pulls in datasets and the cache; only needed here

    backbone = load_backbone(cfg.backbone, "cpu")
    model = build_model(cfg, state["centroids"].shape[0])
    model.load_state_dict(state)
    return (module(backbone, model.head.eval(), model.centroids, cfg.data.eval_short_side, cfg.data.eval_flip),
            backbone)


def _import_onnx_exporter():
    """``onnx`` and ``onnxscript`` (``torch.onnx``'s exporter needs both), or an error saying how to install them."""
    try:
        import onnx
        import onnxscript
    except ImportError as err:
        raise ExportError(f"the ONNX export needs the packages onnx and onnxscript ({err}); install them with "
                          "pip install -e '.[onnx]'") from err
    return onnx, onnxscript


def _double_precision_size_ops() -> dict:
    """ONNX translations of the float steps of ``symbolic_eval_size`` in double precision, as Python computes
    ``eval_size``: ``torch.onnx``'s own translations compute them in float32, which rounds some sizes to the
    other multiple of the patch (e.g. 10 x 25 pixels at short side 42, patch 14)."""
    import builtins
    import operator

    from onnx import TensorProto
    from onnxscript import opset18 as op

    def to_double(value):
        return op.Cast(value, to=TensorProto.DOUBLE)

    def true_divide(dividend, divisor):
        return op.Div(op.Cast(dividend, to=TensorProto.DOUBLE), op.Cast(divisor, to=TensorProto.DOUBLE))

    def round_to_int(value, ndigits=None):  # ONNX Round rounds half to even, as Python's round
        return op.Cast(op.Round(value), to=TensorProto.INT64)

    return {torch.sym_float: to_double, operator.truediv: true_divide, builtins.round: round_to_int}


def onnx_model_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The serialised ONNX model of ``module`` (one ``uint8`` ``(H, W, 3)`` input ``image`` with dynamic H and W,
    one output ``labels``), weights inside; ``example`` is the image ``torch.export`` traces with."""
    _import_onnx_exporter()
    dims = {0: torch.export.Dim("height", min=1), 1: torch.export.Dim("width", min=1)}
    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=(dims,),
                                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET,
                                external_data=False, custom_translation_table=_double_precision_size_ops(),
                                verbose=False)
    try:
        return program.model_proto.SerializeToString()
    except ValueError as err:  # protobuf's 2 GiB limit of one message
        raise ExportError(f"the ONNX model does not fit in one file ({err}); export TorchScript instead") from err


def _write_module(segmenter: SegmenterModule, path: Path, fmt: str) -> Path:
    if fmt == "onnx":
        # any example size but 0 or 1 (torch.export would fix those); the graph's H and W stay dynamic
        example = torch.zeros((2 * segmenter.patch + 3, 3 * segmenter.patch + 5, 3), dtype=torch.uint8)
        return atomic_write_bytes(path, onnx_model_bytes(segmenter, example))
    with warnings.catch_warnings():
        # torch 2.x marks torch.jit as deprecated; TorchScript is still the one self-contained format that loads
        # without this package (torch.jit.load), so it is what we ship
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(segmenter)
        return atomic_write(path, lambda handle: torch.jit.save(scripted, handle))


def _how_to_run(fmt: str, module_file: str) -> dict[str, Any]:
    """The card's fields that say how to load and call the module file."""
    if fmt == "torchscript":
        return {"load": f"torch.jit.load('{module_file}')", "input": INPUT_SPEC, "output": OUTPUT_SPEC}
    onnx, onnxscript = _import_onnx_exporter()
    return {"load": f"onnxruntime.InferenceSession('{module_file}')",
            "run": f"session.run(None, {{'{ONNX_INPUT}': rgb_uint8_hwc}})[0]",
            "input": ONNX_INPUT_SPEC, "output": ONNX_OUTPUT_SPEC,
            "onnx": {"opset": ONNX_OPSET, "onnx_version": onnx.__version__,
                     "onnxscript_version": onnxscript.__version__}}


def export_model(model_path: str | Path, out_dir: str | Path, cfg: FussConfig | None = None,
                 fmt: str = "torchscript") -> dict[str, Any]:
    """Write ``<out_dir>/fuss_segmenter.pt`` (TorchScript) or ``fuss_segmenter.onnx`` (ONNX), and
    ``fuss_segmenter.json`` (the card of that file: one export per folder); returns the card.

    ``cfg`` None: the config saved in the model file (as ``fuss predict``), else the defaults.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        _import_onnx_exporter()  # a missing package: an error before any work
    model_path = Path(model_path)
    state, saved_config, saved_names = read_model_file(model_path)
    if cfg is None:
        cfg = FussConfig.from_dict(saved_config) if saved_config is not None else FussConfig()
    segmenter, backbone = build_segmenter(state, cfg, OnnxSegmenterModule if fmt == "onnx" else SegmenterModule)
    module_path = _write_module(segmenter, Path(out_dir) / MODULE_FILES[fmt], fmt)
    weights = backbone_weights(cfg.backbone.weights)
    weights_file = None if weights in (RANDOM_WEIGHTS, TIMM_WEIGHTS) else Path(weights)
    num_clusters = int(state["centroids"].shape[0])
    card = {
        "format": fmt,
        "module_file": module_path.name,
        **_how_to_run(fmt, module_path.name),
        "num_clusters": num_clusters,
        "cluster_names": cluster_names(saved_names, num_clusters),
        "preprocessing": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "eval_short_side": cfg.data.eval_short_side, "eval_flip": cfg.data.eval_flip,
                          "patch_size": backbone.patch_size,
                          "resize": RESIZE_RULE, "crf": False},
        "backbone": {"name": cfg.backbone.name, "block": backbone.block, "weights": weights,
                     "weights_sha256": weights_sha256(weights_file) if weights_file else None},
        "caveat": backbone_caveat(cfg.backbone, backbone.block),
        "source_model": {"path": str(model_path), "sha256": sha256_file(model_path)},
        "torch_version": torch.__version__,
        "config": cfg.to_dict(),
    }
    atomic_write_json(module_path.parent / CARD_FILE, card)
    log.info("wrote %s and %s (%d clusters, backbone %s up to block %d)", module_path, CARD_FILE,
             num_clusters, cfg.backbone.name, backbone.block)
    return card
