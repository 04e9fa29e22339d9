"""Tests of fuss_components.paths: every location is the configured value, else its environment variable, else the
default under the shared folder (or the user's cache folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuss_components.paths import (CACHE_ENV, DATA_ENV, DEFAULT_WEIGHTS_FILE, SHARED_ENV, WEIGHTS_ENV, backbone_weights,
                                   cache_dir, data_root, shared_root)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Every variable these functions read, set to its own folder under tmp_path."""
    for name in (SHARED_ENV, DATA_ENV, WEIGHTS_ENV, CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name))
    return monkeypatch, tmp_path


def test_data_root_config_then_environment_then_shared(env):
    monkeypatch, tmp = env
    assert data_root("/configured/data") == Path("/configured/data")
    assert data_root() == tmp / DATA_ENV
    monkeypatch.delenv(DATA_ENV)
    assert data_root() == tmp / SHARED_ENV / "data"
    assert shared_root() == tmp / SHARED_ENV


def test_backbone_weights_config_then_environment_then_shared_file(env):
    monkeypatch, tmp = env
    assert backbone_weights("timm") == "timm"
    assert backbone_weights() == str(tmp / WEIGHTS_ENV)
    monkeypatch.delenv(WEIGHTS_ENV)
    assert backbone_weights() == str(tmp / SHARED_ENV / "weights" / DEFAULT_WEIGHTS_FILE)
    assert DEFAULT_WEIGHTS_FILE == "dinov2_vits14_imgfocus.safetensors"


def test_cache_dir_config_then_environment_then_user_cache(env):
    monkeypatch, tmp = env
    assert cache_dir("/scratch/fuss") == Path("/scratch/fuss")
    assert cache_dir() == tmp / CACHE_ENV
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == tmp / "XDG_CACHE_HOME" / "fuss"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp / "home"))
    assert cache_dir() == tmp / "home" / ".cache" / "fuss"


def test_configured_and_environment_paths_expand_the_home_folder(env):
    monkeypatch, tmp = env
    monkeypatch.setenv("HOME", str(tmp / "home"))
    assert data_root("~/data") == tmp / "home" / "data"
    assert cache_dir("~/cache") == tmp / "home" / "cache"
    monkeypatch.setenv(DATA_ENV, "~/env-data")
    assert data_root() == tmp / "home" / "env-data"
    monkeypatch.setenv(SHARED_ENV, "~/shared")
    assert shared_root() == tmp / "home" / "shared"
