"""Backbones: dynamic-size patch features, block selection, strict weights loading, sha256, identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fuss_components.backbones import (
    WeightsError,
    backbone_identity,
    feature_dim,
    load_backbone,
    weights_sha256,
)
from fuss_components.config import BackboneConfig

TINY = "fuss_tiny_vit_patch14"
SHARED_SHA256 = "a40c987d529ca92ac0a12aecaa0e927fda14238ddfe9e34ef6ccb55c314bff10"


def tiny_cfg(weights: str | Path = "random", block: int = -1, sha256: str | None = None) -> BackboneConfig:
    return BackboneConfig(name=TINY, weights=str(weights), block=block, sha256=sha256)


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """State dict of a tiny ViT initialised with `seed` (different from the 'random' backbone's seed 0)."""
    torch.manual_seed(seed)
    model = timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def reference_features(state: dict[str, torch.Tensor], images: torch.Tensor, block: int) -> torch.Tensor:
    model = timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        (feats,) = model.forward_intermediates(images, indices=[block], norm=True, output_fmt="NCHW",
                                               intermediates_only=True)
    return feats


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- tiny random backbone

@pytest.mark.parametrize("hw", [(28, 42), (42, 28), (56, 70), (14, 14)])
def test_tiny_features_shape_dynamic_size(hw):
    backbone = load_backbone(tiny_cfg())
    h, w = hw
    feats = backbone.features(torch.randn(3, 3, h, w))
    assert feats.shape == (3, 32, h // 14, w // 14)
    assert feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert backbone.patch_size == 14 and backbone.feature_dim == 32


def test_tiny_backbone_frozen_no_grad_eval_mode(images):
    backbone = load_backbone(tiny_cfg())
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    x = images.clone().requires_grad_(True)
    feats = backbone.features(x)
    assert not feats.requires_grad and feats.grad_fn is None


def test_random_weights_are_seeded(images):
    a = load_backbone(tiny_cfg()).features(images)
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    b = load_backbone(tiny_cfg()).features(images)
    assert torch.equal(a, b)


def test_feature_dim_without_weights():
    assert feature_dim(tiny_cfg()) == 32


def test_block_selection(images):
    last = load_backbone(tiny_cfg(block=-1))
    first = load_backbone(tiny_cfg(block=0))
    one = load_backbone(tiny_cfg(block=1))
    assert last.block == 1 and first.block == 0 and one.block == 1
    f_last, f_first = last.features(images), first.features(images)
    assert f_last.shape == f_first.shape
    assert not torch.allclose(f_last, f_first, atol=1e-3)
    assert torch.equal(f_last, one.features(images))  # -1 is the last of the 2 blocks


@pytest.mark.parametrize("block", [2, 7, -3])
def test_block_out_of_range(block):
    with pytest.raises(WeightsError, match=f"block={block}"):
        load_backbone(tiny_cfg(block=block))


# ---------------------------------------------------------------------------- weights files

def test_strict_loading_names_file_and_keys(tmp_path):
    state = tiny_state(7)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.extra_scale"] = torch.ones(4)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        load_backbone(tiny_cfg(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "blocks.1.mlp.fc2.bias" in msg
    assert "blocks.1.extra_scale" in msg


def test_shape_mismatch_names_file(tmp_path):
    state = tiny_state(7)
    state["norm.weight"] = torch.ones(33)
    path = tmp_path / "wrong_shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="wrong_shape.safetensors"):
        load_backbone(tiny_cfg(path))


def test_corrupt_file_names_file(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(WeightsError, match="corrupt.safetensors"):
        load_backbone(tiny_cfg(path))


@pytest.mark.parametrize("block", [0, -1])
def test_safetensors_file_reproduces_saved_model(tmp_path, images, block):
    state = tiny_state(7)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    backbone = load_backbone(tiny_cfg(path, block=block))
    feats = backbone.features(images)
    ref = reference_features(state, images, block if block >= 0 else 1)
    assert torch.allclose(feats, ref, atol=1e-6)
    # and they are really the file's weights, not the seeded random initialisation
    random_feats = load_backbone(tiny_cfg(block=block)).features(images)
    assert not torch.allclose(feats, random_feats, atol=1e-3)


def test_pth_with_nested_model_key(tmp_path, images):
    state = tiny_state(11)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 3}, path)
    feats = load_backbone(tiny_cfg(path)).features(images)
    assert torch.allclose(feats, reference_features(state, images, 1), atol=1e-6)


def test_pth_with_module_prefix(tmp_path, images):
    state = tiny_state(12)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    feats = load_backbone(tiny_cfg(path)).features(images)
    assert torch.allclose(feats, reference_features(state, images, 1), atol=1e-6)


def test_sha256_checked(tmp_path, images):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state(7), str(path))
    actual = weights_sha256(path)
    assert len(actual) == 64
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        load_backbone(tiny_cfg(path, sha256=wrong))
    msg = str(err.value)
    assert wrong in msg and actual in msg and str(path) in msg
    # the right hash (any case) loads
    load_backbone(tiny_cfg(path, sha256=actual)).features(images)
    load_backbone(tiny_cfg(path, sha256=actual.upper()))


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(WeightsError, match="nowhere/weights.safetensors"):
        load_backbone(tiny_cfg(path))
    with pytest.raises(WeightsError, match="nowhere/weights.safetensors"):
        backbone_identity(tiny_cfg(path))


def test_unknown_model_name():
    with pytest.raises(WeightsError, match="no_such_vit"):
        load_backbone(BackboneConfig(name="no_such_vit", weights="random"))


def test_backbone_identity(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tiny_state(7), str(a))
    save_file(tiny_state(8), str(b))
    id_a = backbone_identity(tiny_cfg(a))
    assert id_a == backbone_identity(tiny_cfg(a))  # stable
    assert id_a == load_backbone(tiny_cfg(a)).identity
    assert weights_sha256(a) in id_a
    assert backbone_identity(tiny_cfg(a, block=0)) != id_a  # block
    assert backbone_identity(tiny_cfg(b)) != id_a  # other file content
    assert backbone_identity(tiny_cfg()) != id_a  # random weights
    assert backbone_identity(BackboneConfig(name="vit_small_patch14_dinov2", weights=str(a), block=-1)) != id_a
    # same path, new content: the identity follows the content, not the path
    before = os.stat(a)
    save_file(tiny_state(9), str(a))
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns + 10_000_000))  # coarse-timestamp file systems
    assert backbone_identity(tiny_cfg(a)) != id_a
    # a copy of the file at another path is the same backbone
    c = tmp_path / "copy.safetensors"
    c.write_bytes(b.read_bytes())
    assert backbone_identity(tiny_cfg(c)) == backbone_identity(tiny_cfg(b))


def test_weights_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.safetensors"
    save_file(tiny_state(7), str(path))
    monkeypatch.setenv("FUSS_BACKBONE_WEIGHTS", str(path))
    cfg = BackboneConfig(name=TINY, weights=None, block=-1)
    assert backbone_identity(cfg) == backbone_identity(tiny_cfg(path))


# ---------------------------------------------------------------------------- real shared weights

@pytest.fixture(scope="module")
def real_backbone(shared):
    weights = shared / "weights" / "dinov2_vits14_imgfocus.safetensors"
    if not weights.is_file():
        pytest.skip(f"shared weights not found: {weights}")
    cfg = BackboneConfig(name="vit_small_patch14_dinov2", weights=str(weights), sha256=SHARED_SHA256, block=8)
    return load_backbone(cfg)


@pytest.fixture(scope="module")
def camvid_view(shared):
    from fuss_components.datasets import open_dataset
    from fuss_components.transforms import five_crop_views

    ds = open_dataset("camvid", shared / "data")
    image = ds.load_image(ds.ids()[0])
    return five_crop_views(image, 1.0, 224)[4:5]  # centre square of the whole image at 224 px


@pytest.mark.realdata
def test_shared_weights_load_strictly(real_backbone, shared):
    assert real_backbone.block == 8
    assert real_backbone.patch_size == 14 and real_backbone.feature_dim == 384
    assert SHARED_SHA256 in real_backbone.identity
    assert len(real_backbone.model.blocks) == 12
    n_params = sum(p.numel() for p in real_backbone.model.parameters())
    assert n_params == 22_056_192


@pytest.mark.realdata
def test_shared_block8_features_of_camvid(real_backbone, camvid_view):
    assert camvid_view.shape == (1, 3, 224, 224)
    feats = real_backbone.features(camvid_view)
    assert feats.shape == (1, 384, 16, 16)
    assert torch.isfinite(feats).all()
    assert feats.std() > 0.1  # not a constant map
    again = real_backbone.features(camvid_view)
    assert torch.equal(feats, again)  # deterministic


@pytest.mark.realdata
def test_shared_weights_wrong_sha256(shared):
    weights = shared / "weights" / "dinov2_vits14_imgfocus.safetensors"
    wrong = SHARED_SHA256[::-1]
    with pytest.raises(WeightsError) as err:
        load_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights=str(weights), sha256=wrong))
    assert wrong in str(err.value) and SHARED_SHA256 in str(err.value)


def test_projected_features_are_the_features_times_one_shared_orthonormal_matrix(images):
    from dataclasses import replace

    from fuss_components.backbones import projection_matrix
    from fuss_components.config import ConfigError

    full = load_backbone(tiny_cfg())
    cfg = replace(tiny_cfg(), project_dim=12, project_seed=3)
    projected = load_backbone(cfg)
    assert feature_dim(cfg) == projected.feature_dim == 12 and feature_dim(tiny_cfg()) == 32
    matrix = projection_matrix(cfg)
    assert matrix.shape == (32, 12)
    assert torch.allclose(matrix.T @ matrix, torch.eye(12), atol=1e-6)  # orthonormal columns
    # a function of (D', k, seed) only: what every site of a federation computes, and another seed differs
    assert torch.equal(matrix, projection_matrix(replace(cfg)))
    assert not torch.allclose(matrix, projection_matrix(replace(cfg, project_seed=4)))
    expected = torch.einsum("bchw,ck->bkhw", full.features(images), matrix)
    assert torch.allclose(projected.features(images), expected, atol=1e-5)
    assert backbone_identity(cfg) != backbone_identity(tiny_cfg())  # a cache key of its own
    assert backbone_identity(cfg) != backbone_identity(replace(cfg, project_seed=4))
    with pytest.raises(ConfigError, match="project_dim=32 must be below the 32 channels"):
        feature_dim(replace(cfg, project_dim=32))
