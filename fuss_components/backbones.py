"""Frozen self-supervised ViT backbones (timm) that turn images into dense patch features.

Any timm ViT of the DINO / DINOv2 families works (e.g. ``vit_small_patch8_224.dino``,
``vit_base_patch8_224.dino``, ``vit_small_patch14_dinov2``), with weights from timm's pretrained tag
(``weights="timm"``) or from a local ``.safetensors`` / ``.pth`` file, loaded strictly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from . import files
from .config import BackboneConfig, ConfigError
from .paths import DEFAULT_WEIGHTS_FILE, backbone_weights

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # tests only: seeded random initialisation
TIMM_WEIGHTS = "timm"


class WeightsError(ValueError):
    """The weights file is missing, has the wrong hash, or does not match the model; names the file."""


@register_model
def fuss_tiny_vit_patch14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 2-block, 32-channel ViT with DINOv2's patch size, for tests that need a real (random) backbone."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    kwargs.setdefault("img_size", 28)
    return VisionTransformer(patch_size=14, embed_dim=32, depth=2, num_heads=2, **kwargs)


@dataclass
class Backbone:
    """A frozen ViT plus the choice of block; ``features(images)`` returns ``(B, D', H/p, W/p)``."""

    model: VisionTransformer
    block: int
    patch_size: int
    feature_dim: int
    identity: str  # what makes two backbones produce the same numbers (goes into the cache key)
    autocast: torch.dtype | None = None  # backbone.autocast: the dtype of the pass's matrix products, None = float32
    projection: torch.Tensor | None = None  # (D' of the ViT, feature_dim): backbone.project_dim, None = identity

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the selected block after the final norm, prefix (CLS/register) tokens dropped; float32."""
        dtype = self.autocast or torch.float32
        with torch.autocast(images.device.type, dtype=dtype, enabled=self.autocast is not None):
            (feats,) = self.model.forward_intermediates(
                images, indices=[self.block], norm=True, stop_early=True, output_fmt="NCHW", intermediates_only=True
            )
        feats = feats.float()
        if self.projection is not None:
            feats = torch.einsum("bchw,ck->bkhw", feats, self.projection.to(feats.device))
        return feats

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self


def feature_dim(cfg: BackboneConfig) -> int:
    """Channel count D' of the features (``backbone.project_dim`` when set), without loading any weights."""
    full = _architecture(cfg.name).num_features
    if cfg.project_dim is None:
        return full
    if cfg.project_dim >= full:
        raise ConfigError(f"backbone.project_dim={cfg.project_dim} must be below the {full} channels of "
                          f"{cfg.name} (null keeps them all)")
    return cfg.project_dim


@lru_cache(maxsize=8)
def _projection(full: int, dim: int, seed: int) -> torch.Tensor:
    """The (full, dim) matrix with orthonormal columns of ``backbone.project_dim``: a function of its arguments only
    (drawn in float64 from its own generator), so every site of a federation computes the same one."""
    gaussian = torch.randn(full, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis, upper = torch.linalg.qr(gaussian)
    return (basis * torch.sign(torch.diagonal(upper))).float()  # signs fixed: the same whatever LAPACK's convention


def projection_matrix(cfg: BackboneConfig) -> torch.Tensor | None:
    """The projection of ``backbone.project_dim`` (None without one)."""
    if cfg.project_dim is None:
        return None
    return _projection(_architecture(cfg.name).num_features, feature_dim(cfg), cfg.project_seed)


def patch_size(cfg: BackboneConfig) -> int:
    """Patch side p of the backbone (features are ``(H/p, W/p)``), without loading any weights."""
    return _patch_side(_architecture(cfg.name))


def _patch_side(model: VisionTransformer) -> int:
    patch = model.patch_embed.patch_size
    return patch[0] if isinstance(patch, (tuple, list)) else int(patch)


@lru_cache(maxsize=8)
def _architecture(name: str) -> VisionTransformer:
    return timm.create_model(name, pretrained=False, num_classes=0)


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, memoised on (path, size, mtime) because weights files are large."""
    stat = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return files.sha256_file(path)


def backbone_identity(cfg: BackboneConfig) -> str:
    """A string that changes whenever the backbone would produce different features."""
    weights = backbone_weights(cfg.weights)
    if weights in (RANDOM_WEIGHTS, TIMM_WEIGHTS):
        source = weights
    else:
        if not Path(weights).is_file():
            raise WeightsError(f"backbone weights file not found: {weights}")
        source = "sha256:" + weights_sha256(weights)
    identity = f"{cfg.name}|{source}|block={cfg.block}"  # the keys of float32, all-channel caches stay as they were
    if cfg.autocast != "none":
        identity += f"|autocast={cfg.autocast}"
    if cfg.project_dim is not None:
        identity += f"|project={cfg.project_dim},seed={cfg.project_seed}"
    return identity


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Create the timm model, load its weights strictly (checking sha256 when configured), freeze it."""
    weights = backbone_weights(cfg.weights)
    try:
        if weights == RANDOM_WEIGHTS:
            log.warning("backbone %s uses RANDOM weights (meant for tests only)", cfg.name)
            torch.manual_seed(0)
        model = timm.create_model(
            cfg.name, pretrained=weights == TIMM_WEIGHTS, num_classes=0, dynamic_img_size=True
        )
    except RuntimeError as err:  # unknown model name or no pretrained tag
        raise WeightsError(f"cannot create backbone {cfg.name!r}: {err}") from err
    if weights not in (RANDOM_WEIGHTS, TIMM_WEIGHTS):
        _load_weights_file(model, Path(weights), cfg.sha256)
    model.eval().requires_grad_(False)
    n_blocks = len(model.blocks)
    block = cfg.block if cfg.block >= 0 else n_blocks + cfg.block
    if not 0 <= block < n_blocks:
        raise WeightsError(f"backbone.block={cfg.block} is out of range for {cfg.name} ({n_blocks} blocks)")
    autocast = None if cfg.autocast == "none" else getattr(torch, cfg.autocast)
    backbone = Backbone(model, block, _patch_side(model), feature_dim(cfg), backbone_identity(cfg), autocast,
                        projection_matrix(cfg))
    return backbone.to(device)


def _load_weights_file(model: torch.nn.Module, path: Path, sha256: str | None) -> None:
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    if sha256 is not None:
        actual = weights_sha256(path)
        if actual != sha256.lower():
            raise WeightsError(f"sha256 mismatch for {path}: expected {sha256}, got {actual}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or unreadable file: say which
        raise WeightsError(f"cannot read backbone weights {path}: {err}") from err
    state = _unwrap_state_dict(state)
    # official DINO/DINOv2 checkpoints use other key names and a mask token: timm's own converter maps them
    state = checkpoint_filter_fn(state, model)
    if not any(k.startswith("head.") for k in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. shape mismatch
        raise WeightsError(f"weights file {path} does not fit the model: {err}") from err


def _unwrap_state_dict(state: dict) -> dict:
    """Official checkpoints nest the weights (``model``, ``state_dict``, ``teacher``) and may prefix keys."""
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _key_mismatch(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected, given = set(model.state_dict()), set(state)
    return sorted(expected - given), sorted(given - expected)


def backbone_caveat(backbone: BackboneConfig, block: int) -> str:
    """The caveat every reported number and exported model carries: what the features of this backbone can be
    trusted for, naming the weights and the feature block (the shared weights: ``shared/docs/assets.md``)."""
    weights = backbone_weights(backbone.weights)
    if weights == RANDOM_WEIGHTS:
        return f"backbone {backbone.name} with RANDOM weights (tests only): the clusters carry no meaning"
    if Path(weights).name == DEFAULT_WEIGHTS_FILE:
        return ("backbone dinov2_vits14_imgfocus (shared/weights): DINOv2 ViT-S/14 weights very probably fine-tuned "
                f"end to end for image saliency; features from block index {block}; not comparable in absolute "
                "terms with the paper's DINO ViT-B/8 numbers")
    source = "timm's pretrained tag" if weights == TIMM_WEIGHTS else f"weights file {Path(weights).name}"
    return (f"backbone {backbone.name} ({source}); features from block index {block}; cluster ids are "
            "unsupervised, not dataset classes")
