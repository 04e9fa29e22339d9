"""`fuss export`: the TorchScript and ONNX segmenters reproduce `fuss predict` (no CRF), their JSON card is right,
and the FLARE server's export of the final model keeps the model when it fails."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_dataset, tiny_config
from fuss_components.cli import main
from fuss_components.config import FussConfig
from fuss_components.export import (
    CARD_FILE,
    MODULE_FILE,
    ONNX_FILE,
    ONNX_OPSET,
    ExportError,
    export_model,
    onnx_model_bytes,
    symbolic_eval_size,
)
from fuss_components.checkpoint import read_model_file, save_model
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


def _onnx_segmenter(path: Path):
    """The ONNX file through ONNX Runtime, called like the TorchScript module (uint8 (H, W, 3) tensor -> tensor)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # tests share a small machine
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run(None, {"image": image.numpy()})[0]), session


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
    with pytest.raises(ExportError, match="'tflite'; supported: torchscript, onnx"):
        export_model(tiny_model, tmp_path / "x", fmt="tflite")
    assert not (tmp_path / "x").exists()
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

    started = time.perf_counter()
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    onnx_export_seconds = time.perf_counter() - started
    onnx_segmenter, _ = _onnx_segmenter(tmp_path / "onnx" / ONNX_FILE)
    onnx_fraction = _agreement(onnx_segmenter, images, masks)  # the first calls include the session's warm-up
    started = time.perf_counter()
    _agreement(onnx_segmenter, images, masks)
    onnx_seconds = (time.perf_counter() - started) / len(images)
    print(f"\ncamvid export: {export_seconds:.1f} s, module "
          f"{(tmp_path / 'deploy' / MODULE_FILE).stat().st_size / 2**20:.1f} MiB; agreement {fraction:.6f}\n"
          f"onnx export: {onnx_export_seconds:.1f} s, file "
          f"{(tmp_path / 'onnx' / ONNX_FILE).stat().st_size / 2**20:.1f} MiB; agreement {onnx_fraction:.6f}\n"
          f"seconds per image ({len(images)} frames, {torch.get_num_threads()} threads): `fuss predict` CLI "
          f"{predict_cli:.2f} (with backbone load and PNG writing), predict's eager path {eager:.2f}, exported "
          f"first pass {exported_first:.2f}, exported warm {exported:.2f}, onnx runtime (1 thread) warm "
          f"{onnx_seconds:.2f}; ratio exported/predict-eager {exported / eager:.2f}, exported/predict-CLI "
          f"{exported / predict_cli:.2f}, onnx/predict-eager {onnx_seconds / eager:.2f}")
    assert fraction >= MIN_AGREEMENT, fraction
    assert onnx_fraction >= MIN_AGREEMENT, onnx_fraction
    assert card["backbone"]["block"] == 7 and "block index 7" in card["caveat"]
    assert card["backbone"]["weights_sha256"] == _sha256(Path(card["backbone"]["weights"]))


def _eager_predict_seconds(cfg: FussConfig, model: Path, images: list[Path]) -> float:
    """Seconds per image of `fuss predict`'s own computation (no CRF), backbone already loaded."""
    from fuss_components.backbones import load_backbone
    from fuss_components.evaluate import image_logits
    from fuss_components.checkpoint import read_model_file
    from fuss_components.site import build_model

    state, _, _ = read_model_file(model)
    backbone = load_backbone(cfg.backbone)
    head = build_model(cfg, state["centroids"].shape[0])
    head.load_state_dict(state)
    head.eval()
    started = time.perf_counter()
    for path in images:
        image = Image.open(path).convert("RGB")
        image_logits(head, backbone, image, cfg.data.eval_short_side, cfg.data.eval_flip).argmax(0)
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


# ------------------------------------------------------------------------------------------------------- ONNX
ODD_SIZES = [(10, 25), (25, 10), (1, 1), (14, 14), (42, 56), (63, 5), (97, 130)]  # orientations, equal, tiny


def test_onnx_labels_equal_predict(tiny_model, tiny_images, tmp_path):
    from fuss_components.export import SegmenterModule, build_segmenter

    assert main(["export", "--model", str(tiny_model), "--format", "onnx", "--out", str(tmp_path / "deploy")]) == 0
    segmenter, session = _onnx_segmenter(tmp_path / "deploy" / ONNX_FILE)
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [("image", "tensor(uint8)",
                                                                          ["height", "width", 3])]
    assert [(o.name, o.type) for o in session.get_outputs()] == [("labels", "tensor(int64)")]
    masks = _predict_masks(tiny_model, tiny_images, tmp_path / "pred")
    fraction = _agreement(segmenter, sorted(tiny_images.iterdir()), masks)
    assert fraction >= MIN_AGREEMENT, fraction

    # sizes whose backbone size float32 arithmetic gets wrong, both orientations, an image of the backbone size
    state, saved_config, _ = read_model_file(tiny_model)
    reference, _ = build_segmenter(state, FussConfig.from_dict(saved_config), SegmenterModule)
    generator = torch.Generator().manual_seed(0)
    same = total = 0
    for height, width in ODD_SIZES:
        image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        labels = segmenter(image)
        assert labels.shape == (height, width) and labels.dtype == torch.int64
        same += int((labels == reference(image)).sum())
        total += height * width
    assert same / total >= MIN_AGREEMENT, same / total


def test_onnx_card_and_file(tiny_model, tmp_path):
    import onnx

    card = export_model(tiny_model, tmp_path / "deploy", fmt="onnx")
    assert json.loads((tmp_path / "deploy" / CARD_FILE).read_text()) == card
    assert card["format"] == "onnx" and card["module_file"] == ONNX_FILE
    assert card["load"] == f"onnxruntime.InferenceSession('{ONNX_FILE}')" and "'image'" in card["run"]
    assert card["onnx"]["opset"] == ONNX_OPSET == 18 and card["onnx"]["onnx_version"] == onnx.__version__
    assert card["source_model"]["sha256"] == _sha256(tiny_model) and card["num_clusters"] == 3
    model = onnx.load(str(tmp_path / "deploy" / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert not list((tmp_path / "deploy").glob("*.data"))  # the weights are inside the .onnx file


@pytest.mark.parametrize("short_side", [42, 322])
def test_onnx_backbone_size_equals_predicts(short_side, tmp_path):
    """The graph's size arithmetic in double precision, as `eval_size`, on sizes where float32 differs."""
    import onnxruntime

    class BackboneSize(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            view_h, view_w = symbolic_eval_size(image.size(0), image.size(1), short_side, 14)
            return torch.zeros(view_h, view_w, dtype=torch.int64)

    example = torch.zeros((31, 47, 3), dtype=torch.uint8)
    (tmp_path / "size.onnx").write_bytes(onnx_model_bytes(BackboneSize().eval(), example))
    session = onnxruntime.InferenceSession(str(tmp_path / "size.onnx"), providers=["CPUExecutionProvider"])
    sides = (1, 10, 13, 14, 15, 21, 25, 37, 45, 55, 63, 100, 481, 640, 720, 960)
    sizes = [(h, w) for h in sides for w in sides]
    float32_wrong = 0
    for height, width in sizes:
        expected = eval_size(height, width, short_side, 14)
        got = session.run(None, {"image": np.zeros((height, width, 3), np.uint8)})[0].shape
        assert got == expected, (height, width)
        assert symbolic_eval_size(height, width, short_side, 14) == expected  # eager, on ints
        scale = np.float32(short_side) / np.float32(min(height, width))
        in_float32 = tuple(max(14, int(np.round(np.float32(side) * scale / np.float32(14))) * 14)
                           for side in (height, width))
        float32_wrong += in_float32 != expected
    assert float32_wrong > 0  # the sizes above tell double from float32 arithmetic


def test_onnx_file_runs_without_torch(tiny_model, tmp_path):
    """Self-contained: a process that imports only onnxruntime and numpy runs it; a wrong input type is refused."""
    export_model(tiny_model, tmp_path / "deploy", fmt="onnx")
    script = ("import sys, numpy as np, onnxruntime as ort; "
              f"s = ort.InferenceSession({str(tmp_path / 'deploy' / ONNX_FILE)!r}, "
              "providers=['CPUExecutionProvider']); "
              "out = s.run(None, {'image': np.full((40, 56, 3), 120, np.uint8)})[0]; "
              "assert out.shape == (40, 56) and out.dtype == np.int64 and out.max() < 3, (out.shape, out.dtype); "
              "assert not {'torch', 'timm', 'fuss_components'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    segmenter, session = _onnx_segmenter(tmp_path / "deploy" / ONNX_FILE)
    with pytest.raises(Exception, match=r"tensor\(float\).*expected: \(tensor\(uint8\)\)"):
        session.run(None, {"image": np.zeros((40, 56, 3), np.float32)})


def test_onnx_without_its_packages_names_the_extra(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: its import fails
    with pytest.raises(ExportError, match=r"pip install -e '\.\[onnx\]'"):
        export_model(tiny_model, tmp_path / "deploy", fmt="onnx")
    assert main(["export", "--model", str(tiny_model), "--format", "onnx", "--out", str(tmp_path / "deploy")]) == 2
    assert "onnxscript" in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


# ------------------------------------------------------------------------------------- FLARE server option
def test_recorder_export_writes_beside_the_model(tiny_model):
    from fuss_flare.recorder import export_final_model

    record = export_final_model(tiny_model, "torchscript")
    assert record == {"format": "torchscript", "module_file": str(tiny_model.parent / MODULE_FILE),
                      "card_file": str(tiny_model.parent / CARD_FILE)}
    labels = torch.jit.load(record["module_file"])(torch.full((40, 56, 3), 120, dtype=torch.uint8))
    assert labels.shape == (40, 56) and int(labels.max()) < 3
    card = json.loads(Path(record["card_file"]).read_text())
    assert card["format"] == "torchscript" and card["source_model"]["sha256"] == _sha256(tiny_model)


def test_recorder_export_failure_keeps_the_model(tiny_model, tmp_path):
    """The server lacks the backbone weights: the export reports the error, the final model stays untouched."""
    from fuss_flare.recorder import export_final_model, FussRecorder

    state, saved_config, _ = read_model_file(tiny_model)
    missing = tmp_path / "weights_not_on_server.safetensors"
    cfg = FussConfig.from_dict(saved_config).with_overrides({"backbone.weights": str(missing)})
    model = save_model(tmp_path / "app_server" / "fuss_model.pt", state, cfg)
    before = _sha256(model)
    record = export_final_model(model, "onnx")
    assert record["format"] == "onnx" and set(record) == {"format", "error"}
    assert "WeightsError" in record["error"] and str(missing) in record["error"]
    assert _sha256(model) == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["fuss_model.pt"]

    assert FussRecorder().export_format is None  # off unless the job asks for it
    with pytest.raises(ValueError, match="export_format must be one of torchscript, onnx or null, got 'tflite'"):
        FussRecorder(export_format="tflite")


def test_job_option_sets_the_recorder_argument(tmp_path):
    from fuss_flare.job import main as job_main

    def recorder_args(*extra: str) -> dict:
        out = tmp_path / "_".join(extra or ("default",))
        assert job_main(["export", "--preset", "polyp", "--out", str(out), *extra]) == 0
        server = json.loads((out / "fuss_polyp" / "app" / "config" / "config_fed_server.json").read_text())
        return next(c["args"] for c in server["components"] if c["id"] == "recorder")

    assert recorder_args() == {}  # off by default: the committed jobs do not change
    assert recorder_args("--export-format", "onnx") == {"export_format": "onnx"}


# -------------------------------------------------------------------------------------------------- benchmark
def test_export_speed_benchmark_runs_on_two_images(tiny_model, tiny_images, tmp_path):
    from benchmarks.export_speed import get_args_parser, main as bench_main
    from benchmarks.paper import run_command

    out = tmp_path / "export_speed.json"
    assert run_command(get_args_parser(), bench_main, ["--model", str(tiny_model), "--images-dir", str(tiny_images),
                                                        "--images", "2", "--work", str(tmp_path / "work"),
                                                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["backbone"] == "fuss_tiny_vit_patch14" and result["block"] == 1
    assert result["threads"] == torch.get_num_threads() and "RANDOM" in result["caveat"]
    for fmt, file in (("torchscript", MODULE_FILE), ("onnx", ONNX_FILE)):
        figures = result[fmt]
        assert figures["agreement_with_predict"] >= MIN_AGREEMENT, (fmt, figures)
        assert 0 < figures["file_mib"] < 5 and figures["seconds_per_image"] > 0
        assert figures["ratio_vs_predict_eager"] == pytest.approx(
            figures["seconds_per_image"] / result["predict_eager_seconds_per_image"])
    assert list((tmp_path / "work").iterdir()) == []  # the temporary folder is gone


def test_exported_labels_equal_predict_with_projected_features(tiny_data_root, tiny_images, tmp_path):
    """backbone.project_dim travels in the model's config: predict and the exported module both project."""
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"backbone.project_dim": 16})
    state = init_global_state(cfg)
    assert state["head.linear.weight"].shape[1] == 16  # the head reads the projected channels
    state["centroids"] = state["centroids"] + 0.3 * torch.randn(state["centroids"].shape,
                                                                generator=torch.Generator().manual_seed(1))
    model = save_model(tmp_path / "fuss_model.pt", state, cfg)
    assert main(["export", "--model", str(model), "--format", "torchscript", "--out", str(tmp_path / "deploy")]) == 0
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    masks = _predict_masks(model, tiny_images, tmp_path / "pred")
    assert _agreement(segmenter, sorted(tiny_images.iterdir()), masks) >= MIN_AGREEMENT
