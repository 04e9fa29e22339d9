"""Model files: the one writer and the one reader of ``model.pt`` (``fuss train``), ``fuss_model.pt`` and FLARE's
``FL_global_model.pt`` / ``FL_best_global_model.pt`` (a bare state dict, or ``{"model": state, ...}``)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .config import FussConfig
from .files import atomic_torch_save


class ModelFileError(ValueError):
    """A model file that cannot be read or holds no FUSS model; the message names the file."""


class ModelFile(NamedTuple):
    state: dict[str, torch.Tensor]  # head.* + centroids
    config: dict | None  # the config it was trained with (None in FLARE's bare files)
    cluster_names: list[str] | None  # stored by ``fuss name-clusters``


def save_model(path: str | Path, state: dict[str, torch.Tensor], cfg: FussConfig, **extra) -> Path:
    """Write ``{"model": state, "config": cfg, ...}`` atomically; the same ``model`` key as FLARE's persistor."""
    return atomic_torch_save({"model": state, "config": cfg.to_dict(), **extra}, path)


def read_model_file(path: str | Path) -> ModelFile:
    """The model, its config and its cluster names; a missing file raises FileNotFoundError, an unreadable or
    foreign one ModelFileError, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or unsafe content
        raise ModelFileError(f"cannot read model file {path}: {err}") from err
    state, config, names = blob, None, None
    if isinstance(blob, dict) and "model" in blob:
        state, config, names = blob["model"], blob.get("config"), blob.get("cluster_names")
    if not isinstance(state, dict) or "centroids" not in state:
        raise ModelFileError(f"model file {path} holds no FUSS model (no 'centroids' entry)")
    return ModelFile(state, config, names)
