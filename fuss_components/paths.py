"""Where data, weights and caches live. Nothing here is a machine path: every location comes from the
configuration, an environment variable, or the `shared/` folder that sits beside a clone of this repository."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "FUSS_SHARED"  # folder holding data/ and weights/ (the repository's ../shared by default)
DATA_ENV = "FUSS_DATA_ROOT"
WEIGHTS_ENV = "FUSS_BACKBONE_WEIGHTS"
CACHE_ENV = "FUSS_CACHE_DIR"
DEFAULT_WEIGHTS_FILE = "dinov2_vits14_imgfocus.safetensors"


def shared_root() -> Path:
    """$FUSS_SHARED, else the `shared/` folder beside the repository this package was installed from."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV]).expanduser()
    beside_repo = Path(__file__).resolve().parents[2] / "shared"
    if beside_repo.is_dir():
        return beside_repo
    raise FileNotFoundError(
        f"cannot find the shared assets folder: set ${SHARED_ENV} (holding data/ and weights/), "
        f"or ${DATA_ENV} and ${WEIGHTS_ENV} individually"
    )


def data_root(configured: str | None = None) -> Path:
    """Root that holds one folder per dataset: config value, else $FUSS_DATA_ROOT, else <shared>/data."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return shared_root() / "data"


def backbone_weights(configured: str | None = None) -> str:
    """Weights file (or "timm"): config value, else $FUSS_BACKBONE_WEIGHTS, else the shared DINOv2 file."""
    if configured:
        return configured
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    return str(shared_root() / "weights" / DEFAULT_WEIGHTS_FILE)


def cache_dir(configured: str | None = None) -> Path:
    """Feature-cache folder of this site: config value, else $FUSS_CACHE_DIR, else the user's cache folder
    (``$XDG_CACHE_HOME/fuss``, default ``~/.cache/fuss``). Not the working folder: FLARE runs a site's job in a
    workspace it deletes at the next run, which would throw the extracted features away."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fuss"
