"""Human names of a model's clusters, and the per-image area table of ``fuss predict``.

A model file carries its names under the top-level key ``"cluster_names"`` (one string per cluster), which
``fuss predict`` (legends, ``areas.csv`` headers) and ``fuss export`` (the card) read. ``fuss name-clusters``
writes them from a JSON file that is either a list of all names or a dict ``{"3": "polyp", ...}``; a dict
changes only the ids it gives, the others keep the name they had (``cluster i`` when the file had none). Several
clusters may share a name: an over-clustering often splits one class into several clusters.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import atomic_torch_save, atomic_write_text

__all__ = ["ClusterNamesError", "read_names_json", "name_clusters", "area_columns", "area_row", "write_areas_csv"]


class ClusterNamesError(ValueError):
    """A names file that does not fit the model; the message names the file."""


def read_names_json(path: str | Path, current: Sequence[str]) -> list[str]:
    """The names of ``len(current)`` clusters from the JSON file ``path``: a list of them all, or a dict of
    cluster id (a string such as ``"3"``) -> name that replaces only those entries of ``current``."""
    path = Path(path)
    count = len(current)
    try:
        given = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"cluster names file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClusterNamesError(f"cannot read cluster names file {path}: {err}") from err
    if isinstance(given, list):
        if len(given) != count:
            raise ClusterNamesError(f"{path} lists {len(given)} names but the model has {count} clusters "
                                    f"(give all {count}, or a dict such as {{\"3\": \"polyp\"}})")
        pairs = list(enumerate(given))
    elif isinstance(given, dict):
        pairs = []
        for key, name in given.items():
            try:
                cluster = int(key)
            except ValueError:
                raise ClusterNamesError(f"{path}: key {key!r} is not a cluster id (0..{count - 1})") from None
            if not 0 <= cluster < count:
                raise ClusterNamesError(f"{path}: cluster id {cluster} is out of range; the model has {count} "
                                        f"clusters (0..{count - 1})")
            pairs.append((cluster, name))
    else:
        raise ClusterNamesError(f"{path} must hold a list of {count} names or a dict {{cluster id: name}}, "
                                f"not a JSON {type(given).__name__}")
    names = list(current)
    for cluster, name in pairs:
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise ClusterNamesError(f"{path}: the name of cluster {cluster} must be a non-empty one-line string, "
                                    f"got {name!r}")
        names[cluster] = name.strip()
    return names


def name_clusters(model_path: str | Path, names_path: str | Path, out_path: str | Path | None = None) -> list[str]:
    """Store the names of ``names_path`` in the model file ``model_path``, written (atomically) to ``out_path``
    (default: ``model_path`` itself); returns the names. A bare state dict (FLARE's ``FL_global_model.pt``)
    becomes ``{"model": state, "config": None, "cluster_names": names}``; any other keys of a checkpoint stay."""
    import torch

    from .checkpoint import read_model_file
    from .export import cluster_names

    state, _, saved = read_model_file(model_path)  # a missing or foreign file: an error naming it
    names = read_names_json(names_path, cluster_names(saved, int(state["centroids"].shape[0])))
    blob = torch.load(model_path, map_location="cpu", weights_only=True)  # the whole checkpoint, every key
    if not (isinstance(blob, dict) and "model" in blob):
        blob = {"model": blob, "config": None}
    atomic_torch_save({**blob, "cluster_names": names}, out_path or model_path)
    return names


def area_columns(names: Sequence[str]) -> list[str]:
    """Header of ``areas.csv``: ``image_id, width, height``, then per cluster its name (the pixel fraction) and
    ``<name> pixels`` (the count). A name shared by several clusters is written ``<name> (cluster i)``."""
    shared = {n for n, uses in Counter(names).items() if uses > 1}
    labels = [f"{n} (cluster {i})" if n in shared else n for i, n in enumerate(names)]
    return ["image_id", "width", "height"] + labels + [f"{label} pixels" for label in labels]


def area_row(image_id: str, mask: np.ndarray, num_clusters: int) -> list[Any]:
    """One row of ``areas.csv`` for an ``(H, W)`` mask of cluster ids: fractions rounded to 6 decimals, exact
    counts."""
    height, width = mask.shape
    counts = np.bincount(np.asarray(mask, dtype=np.int64).ravel(), minlength=num_clusters)
    if len(counts) > num_clusters:
        raise ValueError(f"mask of image {image_id} holds cluster id {len(counts) - 1} >= {num_clusters}")
    fractions = [round(float(c) / (height * width), 6) for c in counts]
    return [image_id, width, height] + fractions + [int(c) for c in counts]


def write_areas_csv(path: str | Path, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """``areas.csv`` (header :func:`area_columns`, then ``rows`` of :func:`area_row`), written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(area_columns(names))
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())
