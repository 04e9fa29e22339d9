"""Your own images, end to end: two plain unlabeled folders (PNG / JPEG / TIFF, one DICOM), one per simulated site,
through the real `nvflare simulator` (each site extracts its features and trains), `fuss export` of the final model,
and the exported file run on every image, against `fuss predict`.

The simulator's sites share one environment, so one `$FUSS_SITE_CONFIG` serves both: its `{site}` placeholder
becomes each site's FLARE client name (`fuss_flare.load_site_config`). The lead exports the job as README "Your own
images" says, from a machine that sees no folder: `partition=site`, `train.num_clusters`, `federation.min_clients`
and `--deploy-all`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from PIL import Image

from benchmarks.simulator import run_simulator
from conftest import make_image_folder, tiny_config
from fuss_components.cache import FeatureCache
from fuss_components.cli import main as fuss
from fuss_components.config import ConfigError, FussConfig
from fuss_components.datasets import ImageFolderDataset
from fuss_components.export import MODULE_FILE
from fuss_flare import CONFIG_FILE, SITE_CONFIG_ENV, load_site_config

# torch 2.x marks torch.jit deprecated; loading the TorchScript file is exactly what a deployment does
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

CLUSTERS = 3
MIN_AGREEMENT = 0.999  # fraction of pixels whose cluster id must equal `fuss predict`'s (as tests/test_export.py)


def _site_context(app_root: Path, site: str) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    if site:
        fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    return fl_ctx


def test_site_placeholder_becomes_the_flare_client_name(tmp_path, monkeypatch):
    FussConfig.from_dict({"federation": {"rounds": 3}}).save(tmp_path / "app" / "config" / CONFIG_FILE)
    shared = tmp_path / "fuss_site.json"
    shared.write_text(json.dumps({"data.root": "/data", "data.dataset": "{site}", "cache_dir": "/scratch/{site}/c",
                                  "train.num_clusters": 4}))
    monkeypatch.setenv(SITE_CONFIG_ENV, str(shared))
    for site in ("site-1", "hospital-b"):
        cfg = load_site_config(_site_context(tmp_path / "app", site))
        assert (cfg.data.root, cfg.data.dataset, cfg.cache_dir) == ("/data", site, f"/scratch/{site}/c")
        assert (cfg.train.num_clusters, cfg.federation.rounds) == (4, 3)
    with pytest.raises(ConfigError, match=r"fuss_site\.json: data\.dataset uses \{site\}.*names no site"):
        load_site_config(_site_context(tmp_path / "app", ""))
    shared.write_text(json.dumps([["data.dataset", "{site}"]]))
    with pytest.raises(ConfigError, match=r"fuss_site\.json .*JSON object"):
        load_site_config(_site_context(tmp_path / "app", "site-1"))


def _make_site_folders(root: Path) -> dict[str, Path]:
    """site-1: five RGB images of two sizes (PNG, JPEG); site-2: conftest's folder (PNG, JPEG, TIFF and a
    MONOCHROME2 uint16 DICOM with rescale slope / intercept and a window, plus files that are not images)."""
    rng = np.random.default_rng(7)
    first = root / "site-1"
    for i, (h, w) in enumerate([(40, 56), (40, 56), (48, 36), (40, 56), (48, 36)]):
        img = rng.normal(120, 15, (h, w, 3)).clip(0, 255).astype(np.uint8)
        img[h // 3:, : w // 2] = (30, 40, 200)
        path = first / ("scans" if i % 2 else ".") / f"img_{i}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return {"site-1": first, "site-2": make_image_folder(root, "site-2", seed=3)}


@pytest.mark.flare
def test_own_image_folders_through_simulator_export_and_predict(tmp_path):
    folders = _make_site_folders(tmp_path / "data")
    counts = {name: len(ImageFolderDataset(folder).ids()) for name, folder in folders.items()}
    assert counts == {"site-1": 5, "site-2": 4}
    assert [s.extra["format"] for s in ImageFolderDataset(folders["site-2"]).samples()].count("dicom") == 1

    # the lead sees no folder: the job's own data root does not exist
    cfg = tiny_config(tmp_path / "lead_has_no_data", tmp_path / "unused_cache",
                      **{"train.num_clusters": CLUSTERS, "federation.rounds": 2})
    cfg.save(tmp_path / "folders.json")
    assert fuss(["job", "export", "--config", str(tmp_path / "folders.json"), "--set", "partition=site",
                 "--set", "federation.min_clients=2", "--deploy-all", "--name", "own_folders",
                 "--out", str(tmp_path / "jobs")]) == 0
    job = tmp_path / "jobs" / "own_folders"
    assert json.loads((job / "meta.json").read_text())["deploy_map"] == {"app": ["@ALL"]}

    # one site configuration for both simulated sites
    site_config = tmp_path / "fuss_site.json"
    site_config.write_text(json.dumps({"data.root": str(tmp_path / "data"), "data.dataset": "{site}",
                                       "partition": "site", "cache_dir": str(tmp_path / "cache" / "{site}")}))
    run = run_simulator(job, tmp_path / "ws", 2, threads=2, timeout=240,
                        env={SITE_CONFIG_ENV: str(site_config), "OMP_NUM_THREADS": "1"})
    print(f"\nsimulator wall seconds: {run.seconds:.1f}")
    assert run.returncode == 0, run.logs()[-4000:]
    app = run.workspace / "server" / "simulate_job" / "app_server"

    # each site extracted the features of its own images into its own cache
    job_cfg = FussConfig.load(job / "app" / "config" / CONFIG_FILE)
    for name, folder in folders.items():
        site_cfg = job_cfg.with_overrides({"data.dataset": name, "cache_dir": str(tmp_path / "cache" / name)})
        ids = ImageFolderDataset(folder).ids()
        assert FeatureCache(site_cfg, name).missing("train", ids) == [], name

    # two training sites, no validation site
    m = json.loads((app / "metrics.json").read_text())
    assert {n: (s["is_training_site"], s["is_validation_site"], s["num_samples"]) for n, s in m["sites"].items()} \
        == {"site-1": (True, False, 5), "site-2": (True, False, 4)}
    assert [(r["round"], r["accepted"], r["rejected"]) for r in m["rounds"]] == [
        (0, ["site-1", "site-2"], []), (1, ["site-1", "site-2"], [])]
    assert all(r["validation"] == {} and "val_miou" not in r for r in m["rounds"])
    # no validation anywhere: the initial model carries only the sites' label-free criteria, and no best model
    assert set(m["initial"]) == {"selection"} and m["best"] is None
    assert set(m["initial"]["selection"]) == {"inertia", "balance", "correspondence"}  # agreement needs a round
    assert m["final"]["round"] == 1 and m["final"].get("val_miou") is None
    final = torch.load(app / "fuss_model.pt", weights_only=True)
    assert final["rounds"] == 2 and final["model"]["centroids"].shape == (CLUSTERS, 8)

    # the exported file on every image, against `fuss predict` (DICOM read as a site reads it)
    assert fuss(["export", "--model", str(app / "fuss_model.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "deploy")]) == 0
    segmenter = torch.jit.load(str(tmp_path / "deploy" / MODULE_FILE))
    same = total = 0
    for name, folder in folders.items():
        assert fuss(["predict", "--model", str(app / "fuss_model.pt"), "--images", str(folder),
                     "--out", str(tmp_path / "pred" / name)]) == 0
        images = ImageFolderDataset(folder)
        for image_id in images.ids():
            image = images.load_image(image_id)
            labels = segmenter(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))
            assert labels.shape == (image.height, image.width) and labels.dtype == torch.int64, image_id
            assert 0 <= int(labels.min()) and int(labels.max()) < CLUSTERS, image_id
            reference = np.asarray(Image.open(tmp_path / "pred" / name / "masks" / f"{image_id}.png"))
            same += int((labels.numpy() == reference).sum())
            total += reference.size
    assert total == 7 * 40 * 56 + 2 * 48 * 36  # every image of both folders
    assert same / total >= MIN_AGREEMENT, same / total
