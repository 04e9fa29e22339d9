"""fuss_components.files: a writer that fails leaves the target as it was and no temporary file behind."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from fuss_components.files import TMP_PREFIX, atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text


def test_writes_create_the_folder_and_replace_the_whole_file(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(path, {"k": 1})
    atomic_write_json(path, {"k": 2}, indent=1)
    assert json.loads(path.read_text()) == {"k": 2} and path.read_text().endswith("\n")
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]


def test_failed_rename_keeps_the_old_content_and_removes_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old\n")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_write_leaves_nothing(tmp_path):
    def half_then_disk_full(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "x.bin", half_then_disk_full)
    assert list(tmp_path.iterdir()) == []
