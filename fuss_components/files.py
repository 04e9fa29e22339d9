"""Writing files so that a reader never sees half of one.

Every writer goes through a temporary file in the target's folder (``.tmp-<name>.<random>``), then renames it
over the target: a crash, a full disk or a concurrent reader leaves the target absent or complete, never
truncated. On any error the temporary file is removed and the error is raised unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]

TMP_PREFIX = ".tmp-"  # leftovers of a killed writer are easy to spot (and to ignore) by this prefix


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create ``path``'s folder, call ``write(binary file)`` on a temporary file beside ``path``, then rename
    it to ``path``; returns ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, **dumps_kwargs) -> Path:
    """``data`` as JSON with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (argument order as ``torch.save``)."""
    import torch  # only the writers of checkpoints need it

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (weights, cache files and model files alike)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
