"""`fuss export`: the TorchScript segmenter reproduces `fuss predict` (no CRF) and its JSON card is right."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_dataset, tiny_config
from fuss_components.cli import main
from fuss_components.config import FussConfig
from fuss_components.export import CARD_FILE, MODULE_FILE, ExportError, export_model
from fuss_components.runner import save_model
from fuss_components.site import init_global_state
from fuss_components.transforms import eval_size

# torch 2.x marks torch.jit deprecated; loading the TorchScript file is exactly what a deployment does
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

MIN_AGREEMENT = 0.999  # fraction of pixels whose cluster id must equal `fuss predict`'s


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rgb(path: Path) -> torch.Tensor:
    """The exported module's input: uint8 (H, W, 3), read as `fuss predict` reads a .jpg/.png."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


def _predict_masks(model: Path, images: Path, out: Path) -> dict[str, np.ndarray]:
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(out)]) == 0
    return {p.stem: np.asarray(Image.open(p)) for p in (out / "masks").glob("*.png")}


def _agreement(segmenter, images: list[Path], masks: dict[str, np.ndarray]) -> float:
    same = total = 0
    for path in images:
        labels = segmenter(_rgb(path)).numpy()
        reference = masks[path.stem]
        assert labels.shape == reference.shape
        same += int((labels == reference).sum())
        total += labels.size
    return same / total


@pytest.fixture
def tiny_images(tmp_path) -> Path:
    """The tiny dataset's images plus two of other sizes (one smaller than the eval short side, one with a
    different aspect), so the resize inside the module is exercised."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 4, "s3": 2})
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((root / "tiny" / "images").rglob("*.jpg")):
        (folder / path.name).write_bytes(path.read_bytes())
    first = Image.open(sorted(folder.iterdir())[0]).convert("RGB")
    first.resize((61, 37)).save(folder / "odd_61x37.png")
    first.resize((30, 90)).save(folder / "tall_30x90.png")
    return folder


@pytest.fixture
def tiny_model(tiny_data_root, tmp_path) -> Path:
    """An initial tiny model whose centroids are spread a little, saved as `save_model` saves models."""
    cfg = tiny_config(tiny_data_root, tmp_path / "cache")
    state = init_global_state(cfg)
    state["centroids"] = state["centroids"] + 0.3 * torch.randn(state["centroids"].shape,
                                                                generator=torch.Generator().manual_seed(1))
    return save_model(tmp_path / "fuss_model.pt", state, cfg)


def test_exported_labels_equal_predict(tiny_model, tiny_images, tmp_path):
    assert main(["export", "--model", str(tiny_model), "--format", "torchscript", "--out",
                 str(tmp_path / "deploy")]) == 0
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    masks = _predict_masks(tiny_model, tiny_images, tmp_path / "pred")
    images = sorted(tiny_images.iterdir())
    assert len(masks) == len(images) == 8
    fraction = _agreement(segmenter, images, masks)
    assert fraction >= MIN_AGREEMENT, fraction
    assert segmenter(_rgb(images[0])).dtype == torch.int64


def test_resize_rule_equals_predicts(tiny_model, tmp_path):
    export_model(tiny_model, tmp_path / "deploy")
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    for height in (1, 13, 14, 20, 21, 40, 63, 100, 481):
        for width in (1, 7, 28, 35, 42, 56, 99, 640):
            assert tuple(segmenter.eval_size(height, width)) == eval_size(height, width, 42, 14), (height, width)


def test_card_fields_and_hashes(tiny_data_root, tmp_path):
    from safetensors.torch import save_file
    import timm

    weights = tmp_path / "tiny_vit.safetensors"
    vit = timm.create_model("fuss_tiny_vit_patch14", num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"backbone.weights": str(weights)})
    names = ["road", "sky", "car"]
    model = save_model(tmp_path / "fuss_model.pt", init_global_state(cfg), cfg, cluster_names=names)

    card = export_model(model, tmp_path / "deploy")
    on_disk = json.loads((tmp_path / "deploy" / CARD_FILE).read_text())
    assert on_disk == card
    assert card["format"] == "torchscript" and card["module_file"] == MODULE_FILE
    assert card["cluster_names"] == names and card["num_clusters"] == 3
    assert card["backbone"]["weights_sha256"] == _sha256(weights)
    assert card["backbone"]["name"] == "fuss_tiny_vit_patch14" and card["backbone"]["block"] == 1  # -1 resolved
    assert card["source_model"]["sha256"] == _sha256(model)
    assert FussConfig.from_dict(card["config"]) == cfg
    assert card["preprocessing"]["eval_short_side"] == 42 and card["preprocessing"]["patch_size"] == 14
    assert card["preprocessing"]["crf"] is False
    assert "block index 1" in card["caveat"] and "tiny_vit.safetensors" in card["caveat"]


def test_card_defaults_without_names_or_weights_file(tiny_model, tmp_path):
    card = export_model(tiny_model, tmp_path / "deploy")
    assert card["cluster_names"] == ["cluster 0", "cluster 1", "cluster 2"]
    assert card["backbone"]["weights"] == "random" and card["backbone"]["weights_sha256"] is None
    assert "RANDOM" in card["caveat"]


def test_shared_backbone_caveat_names_block():
    from fuss_components.backbones import backbone_caveat

    cfg = FussConfig.from_dict({"backbone": {"weights": "/x/dinov2_vits14_imgfocus.safetensors"}})
    caveat = backbone_caveat(cfg.backbone, 7)
    assert "saliency" in caveat and "block index 7" in caveat and "not comparable" in caveat


def test_bad_model_path_names_the_file(tmp_path, capsys):
    missing = tmp_path / "no_such_model.pt"
    assert main(["export", "--model", str(missing), "--out", str(tmp_path / "deploy")]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no_such_model.pt"):
        export_model(missing, tmp_path / "deploy")

    corrupt = tmp_path / "corrupt_model.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["export", "--model", str(corrupt), "--out", str(tmp_path / "deploy")]) == 2
    assert str(corrupt) in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


def test_unknown_format_and_bad_input(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="onnx"):
        export_model(tiny_model, tmp_path / "x", fmt="onnx")
    export_model(tiny_model, tmp_path / "deploy")
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    with pytest.raises(Exception, match="uint8 tensor of shape"):
        segmenter(torch.zeros(3, 40, 56))


@pytest.mark.realdata
def test_camvid_export_equals_predict_and_speed(shared, tmp_path, monkeypatch):
    """Initial model of the default config (camvid, block 7) on three Seq05VD frames: labels, speed ratio."""
    from fuss_components.datasets import open_dataset

    monkeypatch.setenv("FUSS_SHARED", str(shared))
    ds = open_dataset("camvid", shared / "data")
    frames = tmp_path / "frames"
    frames.mkdir()
    for image_id in ds.ids(site="Seq05VD")[::50][:3]:
        source = ds.sample(image_id).image_path
        (frames / Path(source).name).write_bytes(Path(source).read_bytes())
    cfg = FussConfig()
    model = save_model(tmp_path / "fuss_model.pt", init_global_state(cfg), cfg)
    started = time.perf_counter()
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "deploy")]) == 0
    export_seconds = time.perf_counter() - started
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    images = sorted(frames.iterdir())

    started = time.perf_counter()
    masks = _predict_masks(model, frames, tmp_path / "pred")
    predict_cli = (time.perf_counter() - started) / len(images)
    started = time.perf_counter()
    fraction = _agreement(segmenter, images, masks)  # the first calls include TorchScript's warm-up
    exported_first = (time.perf_counter() - started) / len(images)
    started = time.perf_counter()
    _agreement(segmenter, images, masks)
    exported = (time.perf_counter() - started) / len(images)
    eager = _eager_predict_seconds(cfg, model, images)
    card = json.loads((tmp_path / "deploy" / CARD_FILE).read_text())
    print(f"\ncamvid export: {export_seconds:.1f} s, module "
          f"{(tmp_path / 'deploy' / MODULE_FILE).stat().st_size / 2**20:.1f} MiB; agreement {fraction:.6f}\n"
          f"seconds per image ({len(images)} frames, {torch.get_num_threads()} threads): `fuss predict` CLI "
          f"{predict_cli:.2f} (with backbone load and PNG writing), predict's eager path {eager:.2f}, exported "
          f"first pass {exported_first:.2f}, exported warm {exported:.2f}; ratio exported/predict-eager "
          f"{exported / eager:.2f}, exported/predict-CLI {exported / predict_cli:.2f}")
    assert fraction >= MIN_AGREEMENT, fraction
    assert card["backbone"]["block"] == 7 and "block index 7" in card["caveat"]
    assert card["backbone"]["weights_sha256"] == _sha256(Path(card["backbone"]["weights"]))


def _eager_predict_seconds(cfg: FussConfig, model: Path, images: list[Path]) -> float:
    """Seconds per image of `fuss predict`'s own computation (no CRF), backbone already loaded."""
    import torch.nn.functional as F

    from fuss_components.backbones import load_backbone
    from fuss_components.runner import load_model
    from fuss_components.site import build_model
    from fuss_components.transforms import eval_view

    state, _ = load_model(model)
    backbone = load_backbone(cfg.backbone)
    head = build_model(cfg, state["centroids"].shape[0])
    head.load_state_dict(state)
    head.eval()
    started = time.perf_counter()
    for path in images:
        image = Image.open(path).convert("RGB")
        feats = backbone.features(eval_view(image, cfg.data.eval_short_side, backbone.patch_size)[None])
        F.interpolate(head.cluster_logits(feats), size=image.size[::-1], mode="bilinear")[0].argmax(0)
    return (time.perf_counter() - started) / len(images)


def test_module_loads_without_this_package_or_timm(tiny_model, tmp_path):
    """The file is self-contained: a process that imports only torch loads and runs it."""
    import subprocess
    import sys

    export_model(tiny_model, tmp_path / "deploy")
    script = ("import sys, warnings, torch; warnings.simplefilter('ignore'); "
              f"m = torch.jit.load({str(tmp_path / 'deploy' / MODULE_FILE)!r}); "
              "out = m(torch.full((40, 56, 3), 120, dtype=torch.uint8)); "
              "assert out.shape == (40, 56) and out.dtype == torch.int64; "
              "assert not {'timm', 'fuss_components', 'torchvision'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
