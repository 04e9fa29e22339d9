"""Where a site's training views live (fuss_components.views): in memory or streamed from the cache files, the
same training either way; memory bounded by a budget; the kNN lists cached; the disk checked before extraction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import equal_states, tiny_config
from fuss_components import views as views_module
from fuss_components.cache import CacheError, FeatureCache
from fuss_components.config import ConfigError, FussConfig
from fuss_components.datasets import open_dataset
from fuss_components.site import Site, init_global_state, resolve_partition
from fuss_components.views import choose_storage, knn_from_descriptors, knn_recall

REPO = Path(__file__).resolve().parents[1]


def _site(cfg, name="s1"):
    return Site(cfg, name, resolve_partition(cfg))


@pytest.mark.parametrize("objective", ["stego", "ppap", "primaps"])
def test_streamed_training_equals_in_memory_training(tiny_cfg, objective):
    """The same two rounds with the views held in memory and streamed from the cache files: bit-identical."""
    stego_only = {} if objective == "stego" else {"train.num_random": 5, "loss.grid": 11}  # back to the defaults
    cfg = tiny_cfg.with_overrides({**stego_only, "train.objective": objective})
    states = {}
    for storage in ("memory", "stream"):
        site = _site(cfg.with_overrides({"train.feature_storage": storage}))
        assert site.trainer.feats.streamed == (storage == "stream")
        state = init_global_state(cfg)
        for round_idx in range(2):
            result = site.train(state, round_idx)
            state = result.state
        states[storage] = (state, result.metrics)
    assert equal_states(states["memory"][0], states["stream"][0])
    skip = {"seconds"}
    assert {k: v for k, v in states["memory"][1].items() if k not in skip} == \
        {k: v for k, v in states["stream"][1].items() if k not in skip}


def test_auto_storage_streams_when_the_pool_does_not_fit_the_budget():
    kib = 1 << 10
    # 1,000 views of 32 x 2 x 2 float16 = 256 KiB
    assert choose_storage("auto", 1000, 32, 2, 2, 4, 2, 1024 * kib, "s") == "memory"
    assert choose_storage("auto", 1000, 32, 2, 2, 4, 2, 300 * kib, "s") == "stream"
    assert choose_storage("memory", 1000, 32, 2, 2, 4, 2, 300 * kib, "s") == "memory"  # forced
    with pytest.raises(ValueError, match=r"site 's': train.memory_budget_gb=.* cannot hold the batches of one "
                                         r"training step"):
        choose_storage("auto", 1000, 768, 28, 28, 8, 5, 10 * kib, "s")


def test_a_budget_below_one_step_fails_before_training(tiny_cfg):
    site = _site(tiny_cfg.with_overrides({"train.memory_budget_gb": 1e-7}))
    with pytest.raises(ValueError, match="cannot hold the batches of one training step"):
        site.train(init_global_state(tiny_cfg), 0)
    with pytest.raises(ConfigError, match="train.memory_budget_gb must be > 0"):
        tiny_cfg.with_overrides({"train.memory_budget_gb": 0})


def test_knn_lists_are_cached_and_read_by_the_next_process(tiny_cfg, monkeypatch):
    ds = open_dataset("tiny", tiny_cfg.data.root)
    ids = ds.ids(site="s1")
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids, ["train"], progress=False)
    first = cache.load_train(ids, knn=3)
    assert cache.knn_path(ids, 3).is_file() and cache.checksum_path(cache.knn_path(ids, 3)).is_file()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the kNN lists were recomputed")

    monkeypatch.setattr("fuss_components.cache.knn_from_descriptors", no_recompute)
    again = FeatureCache(tiny_cfg, "tiny").load_train(ids, knn=3)  # a fresh object, as a new process has
    assert torch.equal(first.knn, again.knn)
    assert cache.knn_path(ids, 2) != cache.knn_path(ids, 3) != cache.knn_path(ids[:-1], 3)  # keyed by ids and k
    # a damaged kNN file is recomputed, not trusted
    path = cache.knn_path(ids, 3)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    monkeypatch.undo()
    assert torch.equal(FeatureCache(tiny_cfg, "tiny").load_train(ids, knn=3).knn, first.knn)


def test_each_cache_file_is_hashed_once_per_process(tiny_cfg, monkeypatch):
    """Training reads and checks each file once (no sha256 before the load); validation rounds do not re-read."""
    site = _site(tiny_cfg.with_overrides({"partition": "site"}), "s3")
    site.validate(init_global_state(tiny_cfg))
    _site(tiny_cfg).cache.ensure(site.dataset, site.dataset.ids(site="s1"), ["train"], progress=False)  # extracted
    hashed = []
    real = __import__("hashlib").sha256
    # file contents only (cache keys are hashes of short strings)
    monkeypatch.setattr("fuss_components.cache.hashlib.sha256",
                        lambda data=b"": (len(data) > 1024 and hashed.append(1)) or real(data))
    monkeypatch.setattr("fuss_components.cache.sha256_file", lambda path: hashed.append(path) or "x")
    site.validate(init_global_state(tiny_cfg))  # the second round's validation
    assert hashed == []
    train = _site(tiny_cfg)  # a new process's site: nothing verified yet
    train.train(init_global_state(tiny_cfg), 0)
    assert len(hashed) == 6  # the 6 training files, read once each (the kNN file is smaller than 1 kB here)
    assert not any(isinstance(h, Path) for h in hashed)  # no separate verification pass


def test_a_corrupted_training_file_is_rebuilt_when_the_site_loads_it(tiny_cfg, caplog):
    site = _site(tiny_cfg)
    site.train(init_global_state(tiny_cfg), 0)
    path = site.cache.path("train", site.train_ids[2])
    good = path.read_bytes()
    blob = bytearray(good)
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    again = _site(tiny_cfg)
    again.train(init_global_state(tiny_cfg), 0)
    assert str(path) in caplog.text and "sha256" in caplog.text and "rebuilt" in caplog.text
    assert path.read_bytes() == good


def test_a_file_truncated_while_streaming_is_named(tiny_cfg):
    site = _site(tiny_cfg.with_overrides({"train.feature_storage": "stream"}))
    feats = site.trainer.feats
    path = site.cache.path("train", site.train_ids[0])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError, match=str(path)):
        feats.views(torch.tensor([4]))


def test_extraction_stops_before_work_when_the_disk_is_too_small(tiny_cfg, monkeypatch):
    ds = open_dataset("tiny", tiny_cfg.data.root)
    cache = FeatureCache(tiny_cfg, "tiny")
    need = cache.bytes_needed(ds, "train", ds.ids(site="s1"))
    assert need == 6 * (5 * 32 * 2 * 2 * 2 + 228)
    usage = type("Usage", (), {"free": need - 1})
    monkeypatch.setattr("fuss_components.cache.shutil.disk_usage", lambda folder: usage)
    with pytest.raises(CacheError, match=rf"feature cache folder {cache.root}: extracting 6 image\(s\) needs"):
        cache.ensure(ds, ds.ids(site="s1"), ["train"], progress=False)
    assert not list(Path(tiny_cfg.cache_dir).rglob("*.npy"))


def test_two_stage_knn_finds_most_exact_neighbours():
    """Above EXACT_KNN_MAX_VIEWS the nearest images are found first; on clustered descriptors it keeps most of
    the exact lists (camvid itself is below the threshold: exact)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=gen)
    images = centres.repeat_interleave(10, 0) + 0.3 * torch.randn(200, 16, generator=gen)  # 200 images
    desc = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + 0.1 * torch.randn(1000, 16, generator=gen),
                                         dim=1)
    exact = knn_from_descriptors(desc, 7)
    two_stage = knn_from_descriptors(desc, 7, exact_max_views=10)
    assert (two_stage != torch.arange(1000)[:, None]).all()
    assert knn_recall(two_stage, exact) > 0.9


def test_training_memory_is_bounded(tmp_path):
    """RSS sampled in a subprocess (from after a warm-up), on synthetic cache files of ViT-S/14's shapes: loading
    into memory grows the process by at most 1.2 x the pool; a budget below the pool streams, loading holds
    nothing, and training a site six times larger grows the process by far less than its pool. (No lower bound
    on the in-memory growth: memory the warm-up freed is reused for the pool, 0.59 x of it grew the process once.) The step's own working memory (15-170 MB over repeated runs here) is the noise allowed for."""
    from benchmarks.scale import measure

    small = measure(tmp_path / "cache", 384, 16, 100, "memory", steps=(2, 4))
    assert small["storage"] == "memory"
    assert small["peak_rss_after_load_bytes"] - small["baseline_rss_bytes"] <= 1.2 * small["pool_bytes"], small
    for images in (100, 600):  # 98 and 590 MB of views; budget 120 MB (one step reads ahead 92 MB)
        result = measure(tmp_path / "cache", 384, 16, images, "auto", steps=(2, 4), budget_gb=0.12)
        assert result["storage"] == "stream", result
        # loading holds the descriptors (1/128 of the pool) and one block of kNN similarities, not the views
        loaded = result["peak_rss_after_load_bytes"] - result["baseline_rss_bytes"]
        assert loaded <= 0.05 * result["pool_bytes"] + views_module.KNN_CHUNK_BYTES, result
        assert result["peak_rss_bytes"] - result["baseline_rss_bytes"] <= 0.4 * 590e6, result
