"""What may leave a site: the schema of a FUSS site's results, checked by pure functions (no FLARE here).

A site sends the server three kinds of content:

* the parameters of the shared model: the projection head's ``head.*`` tensors and the ``centroids``, with the
  names, shapes and floating dtypes of the model the job's configuration describes (:func:`expected_state_shapes`);
* two declared numbers and a name: ``num_samples`` (the site's training images, at most what the site holds),
  the site's name, and in the site census its role;
* metrics from fixed lists (:data:`TRAIN_METRICS`, :data:`VALIDATION_METRICS`, :data:`SITE_INFO_METRICS`), each a
  finite float, counts and fractions within their ranges, ``per_class_iou`` one IoU per class;
* analytics scalars under fixed tags (:data:`ANALYTICS_TAGS`).

The FLARE result filter (``fuss_flare.filters``) holds every outgoing result against this schema, so a job cannot
widen it: what is allowed is fixed here or derived from the job's configuration under bounds the site sets
(:class:`SiteLimits`, :func:`job_schema`). The filter only reads FLARE's objects, calls :func:`check_headers` and
:func:`check_result`, and writes back what passes; the analytics forwarder calls :func:`check_analytics`, and the
optional centroid privacy filter :func:`release_centroids` (``fuss_components.privacy``). Every ``check_*``
function returns what passes, as fresh values of plain types (tensors copied into their own storage), and a
``(name, reason)`` pair for everything it drops; none raises on bad content.

What the schema cannot close: every float that passes carries its own bits (a head of N float32 parameters is N * 4
bytes the job's code chose). Only the code that computes them (the installed ``fuss_components``) and noise
(``fuss_components.privacy``) bound what those bits say about the site's images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import FederationConfig

from .head import CENTROIDS_KEY, HEAD_PREFIX

# Every key `Site.train` can put into a result's metrics, for every objective (trainer.py's step classes).
TRAIN_METRICS = (
    "loss_self", "loss_knn", "loss_random", "loss_centroids",  # stego (FUSS); ppap shares loss_centroids
    "loss_smooth_within", "loss_smooth_cross", "loss_prototypes",  # smooseg
    "loss_focal", "pseudo_labelled",  # primaps
    "loss_ppap", "ppap_positives", "ppap_negatives",  # ppap
    "loss_fedprox", "loss_moon",  # with train.fedprox_mu > 0 / train.moon_weight > 0
    "steps", "clusters_reseeded", "clusters_used", "centroids_replaced", "seconds",  # LocalTrainer.train
    "skipped_images",  # Site.train
    # Site.train: label-free criteria of the received global model (fuss_components.selection.METRICS)
    "selection_inertia", "selection_balance", "selection_agreement", "selection_correspondence",
)
VALIDATION_METRICS = ("miou", "pixel_acc", "per_class_iou", "clusters_used", "num_images")
SITE_INFO_METRICS = ("is_training_site", "is_validation_site", "num_samples")
# A train result's metrics: its training metrics and, on a validation site, those of the received model.
TRAIN_RESULT_METRICS = TRAIN_METRICS + tuple(m for m in VALIDATION_METRICS if m not in TRAIN_METRICS)

# The three results a site returns, named as the FLARE tasks that ask for them (fuss_flare's TASK_* are these).
TRAIN_RESULT, VALIDATE_RESULT, SITE_INFO_RESULT = "train", "validate", "site_info"
RESULT_METRICS = {VALIDATE_RESULT: VALIDATION_METRICS, SITE_INFO_RESULT: SITE_INFO_METRICS}

# The meta keys a result may carry: what a FUSS site declares, and two keys FLARE itself writes there (the values
# of FLARE's MetaKey.INITIAL_METRICS and MetaKey.FILTER_HISTORY; the FLARE layer's tests pin all four).
META_NUM_SAMPLES = "num_samples"
META_SITE = "site"
META_INITIAL_METRICS = "initial_metrics"  # a train result's metrics
META_FILTER_HISTORY = "filter_history"  # the class names of the DXO filters already applied
# Scalars a site may stream to the server's TensorBoard.
ANALYTICS_TAGS = tuple(f"train/{name}" for name in TRAIN_METRICS) + ("val/miou", "val/pixel_acc", "val/clusters_used")

TORCH_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NUMPY_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))  # native byte order only

DEFAULT_MAX_CENTROID_NORM = FederationConfig.max_centroid_norm  # the server's bound (reason in config.py)
# Head plus centroids of the largest honest configuration (ViT-g features, 1536 channels, D = 70) are about
# 2.6 million numbers; a job that declares a far larger model is refused rather than given room to fill.
DEFAULT_MAX_HEAD_PARAMETERS = 10_000_000
MAX_NAME_LENGTH = 64  # a site name in the meta, a filter name in FLARE's filter history
MAX_FILTER_HISTORY = 32  # entries of the filter history
MAX_ROUND = 1_000_000  # the largest round number a header may carry



@dataclass(frozen=True)
class SiteBounds:
    """What a site knows of itself, independently of the job, for the value checks (None: unknown, and the values
    that need the bound are dropped)."""

    num_classes: int | None = None  # classes of the site's dataset: the length of per_class_iou
    num_clusters: int | None = None  # |C| of the job's model: the most clusters_used can be
    training_images: int | None = None  # the most num_samples can be
    validation_images: int | None = None  # the most num_images can be


# ------------------------------------------------------------------------------------------- the model's parameters


def expected_state_shapes(cfg, num_clusters: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the FussModel ``cfg`` describes (``head.*`` and ``centroids``).

    Built on PyTorch's meta device: no memory is allocated, whatever sizes the configuration declares.
    ``num_clusters`` defaults to ``cfg.train.num_clusters``; ValueError when neither gives it."""
    from .backbones import feature_dim
    from .head import FussModel

    clusters = num_clusters or cfg.train.num_clusters
    if not clusters:
        raise ValueError("the number of clusters is neither configured nor known from the site's dataset")
    in_dim = feature_dim(cfg.backbone)  # outside the meta-device block: it may build (and cache) a real model
    with torch.device("meta"):
        model = FussModel(in_dim, cfg.train.dim, int(clusters), cfg.train.dropout)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def count_parameters(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Total number of values of the parameters ``shapes`` describes."""
    return sum(math.prod(shape) for shape in shapes.values())


def check_state(state: Mapping, expected_shapes: Mapping[str, tuple[int, ...]],
                max_centroid_norm: float = DEFAULT_MAX_CENTROID_NORM) -> tuple[dict, list[tuple[str, str]]]:
    """Keep the parameters that are exactly the model's: an expected name, a torch tensor or numpy array (not a
    subclass), a floating dtype, the expected shape, finite values, and for the centroids every row norm at most
    ``max_centroid_norm``. Kept values are fresh contiguous copies (no shared storage, no attached attributes)."""
    kept, dropped = {}, []
    for name, value in state.items():
        if not isinstance(name, str) or name not in expected_shapes:
            what = "head" if isinstance(name, str) and name.startswith(HEAD_PREFIX) else "model"
            dropped.append((describe(name), f"not a parameter of the configured {what}"))
            continue
        array, reason = _float_array(value, expected_shapes[name])
        if reason is None and name == CENTROIDS_KEY:
            norms = _row_norms(array)
            if float(norms.max()) > max_centroid_norm:
                reason = f"a centroid row norm is {float(norms.max()):.3g}, above the bound {max_centroid_norm:g}"
        if reason is not None:
            dropped.append((name, reason))
        else:
            kept[name] = array
    return kept, dropped


def _float_array(value, shape: tuple[int, ...]):
    """(fresh copy, None) for a finite floating tensor / array of ``shape``, else (None, reason)."""
    if type(value) is torch.Tensor:
        if value.layout != torch.strided or value.is_quantized:
            return None, f"a {value.layout} tensor, not a dense one"
        if value.dtype not in TORCH_FLOAT_DTYPES:
            return None, f"dtype {value.dtype}, not a floating dtype"
        if value.device.type == "meta":
            return None, "a tensor without data"
        if tuple(value.shape) != shape:
            return None, f"shape {tuple(value.shape)}, expected {shape}"
        copy = value.detach().to("cpu").resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
        if not bool(torch.isfinite(copy).all()):
            return None, "non-finite values"
        return copy, None
    if type(value) is np.ndarray:
        if value.dtype not in NUMPY_FLOAT_DTYPES:
            return None, f"dtype {value.dtype}, not a native floating dtype"
        if tuple(value.shape) != shape:
            return None, f"shape {tuple(value.shape)}, expected {shape}"
        copy = np.array(value, dtype=value.dtype, order="C", copy=True)
        if not bool(np.isfinite(copy).all()):
            return None, "non-finite values"
        return copy, None
    return None, f"a {type(value).__name__}, not a tensor"


def _row_norms(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return torch.linalg.vector_norm(array.double(), dim=-1).numpy()
    return np.linalg.norm(array.astype(np.float64), axis=-1)


# ------------------------------------------------------------------------------------------- numbers and names


def check_num_samples(value, max_count: int | None, minimum: int = 1) -> tuple[int | None, str | None]:
    """``(value, None)`` when ``value`` is an integer (not a bool, not a float) in ``[minimum, max_count]``, else
    ``(None, reason)``; a ``max_count`` of None (the site's image count is unknown) admits nothing."""
    if not _is_integer(value):
        return None, f"a {type(value).__name__}, not an integer"
    value = int(value)
    if max_count is None:
        return None, "the site's image count is unknown, so no count can be checked"
    if not minimum <= value <= max_count:
        return None, f"{_short_number(value)} is outside {minimum}..{max_count} (the site's training images)"
    return value, None


def whole_count(value, limit: int) -> tuple[int | None, str | None]:
    """``(count, None)`` for a whole number in ``0..limit`` (an int, or a whole float as metrics travel; not a
    bool), else ``(None, reason)``. The one count rule of a site's metrics and of the server's census."""
    number = _real(value)
    if number is None:
        return None, f"a {type(value).__name__}, not a number"
    if not math.isfinite(number) or not number.is_integer() or not 0 <= number <= limit:
        return None, f"{_short_number(number)} is not a whole number in 0..{limit}"
    return int(number), None


def check_site_name(value, known_names: Iterable[str] = ()) -> tuple[str | None, str | None]:
    """``(value, None)`` for a printable string of at most :data:`MAX_NAME_LENGTH` characters that is one of
    ``known_names`` (when any are given), else ``(None, reason)``."""
    if type(value) is not str:
        return None, f"a {type(value).__name__}, not a string"
    if not 0 < len(value) <= MAX_NAME_LENGTH or not value.isprintable():
        return None, f"not a printable name of 1..{MAX_NAME_LENGTH} characters"
    known = [n for n in known_names if n]
    if known and value not in known:
        return None, f"not this site's name ({', '.join(sorted(set(known)))})"
    return value, None


def check_scalar(tag, value, allowed_tags: Iterable[str] = ANALYTICS_TAGS) -> tuple[float | None, str | None]:
    """``(float value, None)`` for a finite real ``value`` under one of ``allowed_tags``, else ``(None, reason)``."""
    if not isinstance(tag, str) or tag not in tuple(allowed_tags):
        return None, "not one of the declared analytics tags"
    number = _real(value)
    if number is None:
        return None, f"a {type(value).__name__}, not a number"
    if not math.isfinite(number):
        return None, "not a finite number"
    return number, None


def check_step(step, max_step: int) -> tuple[int | None, str | None]:
    """``(step, None)`` for no step (None) or an integer (not a bool) in ``0..max_step``, else ``(None, reason)``."""
    if step is not None and not (type(step) is int and 0 <= step <= max_step):
        return None, f"step is not an integer in 0..{max_step}"
    return step, None


def check_analytics(tag, value, step, max_step: int) -> tuple[float | None, int | None, str | None]:
    """``(float value, step, None)`` for a scalar that passes :func:`check_scalar` with a step that passes
    :func:`check_step`, else ``(None, None, reason)``."""
    number, reason = check_scalar(tag, value)
    if reason is None:
        step, reason = check_step(step, max_step)
    return (number, step, None) if reason is None else (None, None, reason)


def describe_forwarded(forwarded: Mapping[str, int], dropped: int) -> str:
    """The analytics a site forwarded in a run, for an audit line: how many scalars under each tag, how many
    events it dropped."""
    tags = ", ".join(f"{tag} x{n}" for tag, n in sorted(forwarded.items())) or "none"
    return f"forwarded {sum(forwarded.values())} scalar(s) ({tags}), dropped {dropped} event(s)"


def check_filter_history(value) -> tuple[list[str] | None, str | None]:
    """``(a copy, None)`` for a list of at most :data:`MAX_FILTER_HISTORY` filter class names (identifiers of at
    most :data:`MAX_NAME_LENGTH` characters), else ``(None, reason)``."""
    if type(value) is not list or len(value) > MAX_FILTER_HISTORY:
        return None, f"not a list of at most {MAX_FILTER_HISTORY} filter names"
    if not all(type(v) is str and v.isidentifier() and len(v) <= MAX_NAME_LENGTH for v in value):
        return None, "an entry is not a filter class name"
    return list(value), None


# ------------------------------------------------------------------------------------------- metrics

_FRACTIONS = ("miou", "pixel_acc", "pseudo_labelled", "selection_balance", "selection_agreement")
_FLAGS = ("is_training_site", "is_validation_site")
_COSINES = ("selection_inertia",)


def check_metrics(metrics, allowed: Iterable[str], bounds: SiteBounds = SiteBounds()
                  ) -> tuple[dict, list[tuple[str, str]]]:
    """Keep the metrics named in ``allowed`` whose values fit their rule; every value comes out a Python float
    (``per_class_iou`` a list of them).

    Rules: every metric a finite real number; ``miou``, ``pixel_acc``, ``pseudo_labelled``,
    ``selection_balance``, ``selection_agreement`` in [0, 1]; ``selection_inertia`` in [-1, 1];
    ``is_training_site`` / ``is_validation_site`` 0 or 1; ``clusters_used`` and ``centroids_replaced`` whole
    numbers in 0..num_clusters;
    ``num_samples`` (site census) a whole number in 0..training_images; ``num_images`` in 0..validation_images;
    ``per_class_iou`` a list of exactly num_classes numbers, each in [0, 1] or NaN (a class absent from the site's
    validation images). A rule whose bound is unknown (None in ``bounds``) admits nothing."""
    if not isinstance(metrics, Mapping):
        return {}, [("", f"a {type(metrics).__name__}, not a dict of metrics")]
    allowed = tuple(allowed)
    kept, dropped = {}, []
    for name, value in metrics.items():
        if not isinstance(name, str) or name not in allowed:
            dropped.append((describe(name), "not a declared metric"))
            continue
        checked, reason = _check_metric(name, value, bounds)
        if reason is None:
            kept[name] = checked
        else:
            dropped.append((name, reason))
    return kept, dropped


def _check_metric(name: str, value, bounds: SiteBounds):
    if name == "per_class_iou":
        return _check_per_class_iou(value, bounds.num_classes)
    number = _real(value)
    if number is None:
        return None, f"a {type(value).__name__}, not a number"
    if not math.isfinite(number):
        return None, "not a finite number"
    if name in _FRACTIONS and not 0.0 <= number <= 1.0:
        return None, f"{_short_number(number)} is outside [0, 1]"
    if name in _COSINES and not -1.0 <= number <= 1.0:
        return None, f"{_short_number(number)} is outside [-1, 1]"
    if name in _FLAGS and number not in (0.0, 1.0):
        return None, f"{_short_number(number)} is not 0 or 1"
    limits = {"clusters_used": (bounds.num_clusters, "clusters of the model"),
              "centroids_replaced": (bounds.num_clusters, "clusters of the model"),
              "num_samples": (bounds.training_images, "the site's training images"),
              "num_images": (bounds.validation_images, "the site's validation images")}
    if name in limits:
        limit, what = limits[name]
        if limit is None:
            return None, f"the number of {what} is unknown, so the count cannot be checked"
        if whole_count(number, limit)[0] is None:
            return None, f"{_short_number(number)} is not a whole number in 0..{limit} ({what})"
    return number, None


def _check_per_class_iou(value, num_classes: int | None):
    if num_classes is None:
        return None, "the number of classes of the site's dataset is unknown"
    if type(value) not in (list, tuple):
        return None, f"a {type(value).__name__}, not a list"
    if len(value) != num_classes:
        return None, f"{len(value)} entries, expected one per class ({num_classes})"
    out = []
    for entry in value:
        number = _real(entry)
        if number is None:
            return None, f"an entry is a {type(entry).__name__}, not a number"
        if math.isnan(number):
            out.append(math.nan)  # the canonical NaN: a NaN's payload bits would otherwise travel
        elif 0.0 <= number <= 1.0:
            out.append(number)
        else:
            return None, f"an entry is {_short_number(number)}, outside [0, 1]"
    return out, None


# ------------------------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class HeaderRules:
    """The headers a transport needs on a result, under the transport's own names (FLARE's are given by
    ``fuss_flare.filters``); every other header is dropped."""

    return_code: str  # the key of the return code
    return_codes: frozenset[str]  # the values the return code may take
    content_type: str  # the key of the content type
    content_type_value: str  # the one content type a result may declare
    name_keys: tuple[str, ...] = ()  # keys whose values are short printable names (task name, task id)
    round_keys: tuple[str, ...] = ()  # keys whose values are round numbers in 0..MAX_ROUND


def check_headers(headers, rules: HeaderRules) -> tuple[dict, list[tuple[str, str]]]:
    """Keep the headers ``rules`` name with a value of their type; no headers (None) is an empty dict."""
    if not isinstance(headers, dict):
        return {}, [] if headers is None else [("headers", f"a {type(headers).__name__}, not a dict")]
    kept, dropped = {}, []
    for key, value in headers.items():
        reason = _header_problem(key, value, rules)
        if reason is None:
            kept[key] = value
        else:
            dropped.append((f"header[{describe(key)}]", reason))
    return kept, dropped


def _header_problem(key, value, rules: HeaderRules) -> str | None:
    if key == rules.return_code:
        return None if isinstance(value, str) and value in rules.return_codes else "not a FLARE return code"
    if key == rules.content_type:
        return None if value == rules.content_type_value else f"not the {rules.content_type_value} content type"
    if key in rules.name_keys:
        return check_site_name(value)[1]  # a short printable string
    if key in rules.round_keys:
        return None if type(value) is int and 0 <= value <= MAX_ROUND else f"not a round number 0..{MAX_ROUND}"
    return "not a header FLARE needs"


# ------------------------------------------------------------------------------------------- a whole result


@dataclass(frozen=True)
class SiteLimits:
    """The bounds a site sets on what leaves it, whatever a job declares."""

    # the most training images the site ever declares; with its dataset's count the smaller applies (None: the
    # dataset's count alone)
    max_num_samples: int | None = None
    max_head_parameters: int = DEFAULT_MAX_HEAD_PARAMETERS  # a job's model with more numbers sends no parameters
    max_centroid_norm: float = DEFAULT_MAX_CENTROID_NORM  # the largest L2 norm of a centroid row

    def __post_init__(self):
        if self.max_num_samples is not None and (type(self.max_num_samples) is not int or self.max_num_samples < 0):
            raise ValueError(f"max_num_samples must be a non-negative integer, got {self.max_num_samples!r}")
        if not self.max_head_parameters > 0:
            raise ValueError(f"max_head_parameters must be > 0, got {self.max_head_parameters}")
        if not self.max_centroid_norm > 0:
            raise ValueError(f"max_centroid_norm must be > 0, got {self.max_centroid_norm}")
        object.__setattr__(self, "max_head_parameters", int(self.max_head_parameters))
        object.__setattr__(self, "max_centroid_norm", float(self.max_centroid_norm))


@dataclass(frozen=True)
class JobSchema:
    """What may leave one site in one job (:func:`job_schema`)."""

    shapes: dict[str, tuple[int, ...]] | None  # the parameters of the job's model; None: no parameter may leave
    shapes_problem: str  # why shapes is None ("" otherwise)
    bounds: SiteBounds
    bounds_problem: str  # why the site's own counts are unknown ("" when they are known)
    site_names: tuple[str, ...]  # the names this site may declare
    max_centroid_norm: float = DEFAULT_MAX_CENTROID_NORM


def job_schema(cfg, site: str, limits: SiteLimits = SiteLimits(), policy=None) -> JobSchema:
    """The schema of the job ``cfg`` on the site named ``site`` under the site's ``limits`` and disclosure
    ``policy`` (``fuss_components.disclosure.DisclosurePolicy``; None: its defaults). Never raises: a site whose data
    cannot be resolved gets unknown counts (``bounds_problem``), a model that cannot be derived, is larger than
    ``limits.max_head_parameters`` or has more clusters or a wider head than the policy allows lets no parameter
    leave (``shapes_problem``)."""
    from .backbones import feature_dim
    from .disclosure import DisclosurePolicy, model_problems

    try:
        site_name, bounds = site_bounds(cfg, site)
        bounds_problem = ""
    except Exception as err:
        site_name, bounds = site, SiteBounds(num_clusters=cfg.train.num_clusters)
        bounds_problem = f"{type(err).__name__}: {err}"
    if limits.max_num_samples is not None:
        known = bounds.training_images
        bounds = replace(bounds, training_images=limits.max_num_samples if known is None
                         else min(known, limits.max_num_samples))
    try:
        shapes = expected_state_shapes(cfg, bounds.num_clusters)
        size = count_parameters(shapes)
        shapes_problem = ""
        problems = model_problems(cfg, policy or DisclosurePolicy(), feature_dim(cfg.backbone),
                                  shapes[CENTROIDS_KEY][0])
        if size > limits.max_head_parameters:
            problems.insert(0, f"the job's model has {size} parameters, more than this site's "
                               f"max_head_parameters={limits.max_head_parameters}")
        if problems:
            shapes, shapes_problem = None, "; ".join(problems)
    except Exception as err:
        shapes, shapes_problem = None, f"the job's model cannot be derived ({type(err).__name__}: {err})"
    return JobSchema(shapes, shapes_problem, bounds, bounds_problem, tuple({site, site_name} - {""}),
                     limits.max_centroid_norm)


def check_result(kind: str, data, meta, schema: JobSchema) -> tuple[dict, dict, list[tuple[str, str]]]:
    """``(kept data, kept meta, dropped)`` of a result of ``kind`` (:data:`TRAIN_RESULT`, :data:`VALIDATE_RESULT`
    or :data:`SITE_INFO_RESULT`); dropped names are ``data[...]`` and ``meta[...]``. ``meta`` None: no meta.

    A train result's data are the model's parameters (:func:`check_state`), its meta ``num_samples`` (at least 1
    when parameters pass, at most the site's training images), ``site``, ``initial_metrics``
    (:data:`TRAIN_RESULT_METRICS`) and ``filter_history``; a metrics result's data are the metrics of
    :data:`RESULT_METRICS`, its meta ``site`` and ``filter_history``. ValueError for any other ``kind``."""
    if kind == TRAIN_RESULT:
        if schema.shapes is None:
            kept_data, bad = {}, [(describe(name), schema.shapes_problem) for name in data]
        else:
            kept_data, bad = check_state(data, schema.shapes, schema.max_centroid_norm)
    elif kind in RESULT_METRICS:
        kept_data, bad = check_metrics(data, RESULT_METRICS[kind], schema.bounds)
    else:
        raise ValueError(f"not a FUSS result: {describe(kind)}")
    kept_meta, meta_dropped = _check_meta(meta or {}, schema, train=kind == TRAIN_RESULT,
                                          has_parameters=bool(kept_data))
    return kept_data, kept_meta, [(f"data[{name}]", reason) for name, reason in bad] + meta_dropped


def _check_meta(meta: Mapping, schema: JobSchema, train: bool,
                has_parameters: bool) -> tuple[dict, list[tuple[str, str]]]:
    kept, dropped = {}, []
    for key, value in meta.items():
        name = f"meta[{describe(key)}]"
        if key == META_SITE:
            checked, reason = check_site_name(value, schema.site_names)
        elif key == META_FILTER_HISTORY:
            checked, reason = check_filter_history(value)
        elif train and key == META_NUM_SAMPLES:
            # parameters are weighted by this count: a result with parameters declares at least one image
            checked, reason = check_num_samples(value, schema.bounds.training_images,
                                                minimum=1 if has_parameters else 0)
        elif train and key == META_INITIAL_METRICS:
            checked, bad = check_metrics(value, TRAIN_RESULT_METRICS, schema.bounds)
            dropped += [(f"{name}[{metric}]" if metric else name, why) for metric, why in bad]
            if isinstance(value, dict):
                kept[key] = checked
            continue
        else:
            checked, reason = None, "not a declared meta key"
        if reason is None:
            kept[key] = checked
        else:
            dropped.append((name, reason))
    return kept, dropped


def describe_sent(data: Mapping, meta: Mapping, schema: JobSchema | None = None) -> str:
    """What a checked result sends, for an audit line: the data's names, the declared count and name with their
    values, the metric names, other meta keys; and why the site's own counts are unknown when they are."""
    parts = []
    for key, value in meta.items():
        if key in (META_NUM_SAMPLES, META_SITE):
            parts.append(f"{key}={value}")
        elif key == META_INITIAL_METRICS:
            parts.append(f"{key}[{', '.join(value)}]")
        else:
            parts.append(str(key))
    text = f"{len(data)} item(s) sent ({', '.join(data) or 'none'}), meta ({', '.join(parts) or 'none'})"
    if schema is not None and schema.bounds_problem:
        text += f"; the site's own counts are unknown: {schema.bounds_problem}"
    return text


def describe_dropped(dropped: list[tuple[str, str]]) -> str:
    """The end of an audit line: how many items were dropped, each named with its reason (never its value)."""
    if not dropped:
        return "nothing dropped"
    return f"{len(dropped)} dropped: " + "; ".join(f"{name} ({reason})" for name, reason in dropped)


# ------------------------------------------------------------------------------------------- the site's own data


def site_bounds(cfg, site: str) -> tuple[str, SiteBounds]:
    """``(the site's partition name, its SiteBounds)`` from the site's own dataset and the configured partition.

    Reads the dataset's index (no image, no label, no feature): the training and validation image counts are the
    site's partition entries restricted to image ids its dataset really has, so a partition cannot declare more
    images than the site holds. For a preset with ``bounds_from_dataset_size`` both counts are the dataset's image
    count.
    Raises (``DataError``, ``ConfigError``) when the site or its dataset cannot be resolved."""
    from .presets import PRESETS, parse_partition_spec
    from .site import num_clusters, open_site_dataset, resolve_partition, resolve_site_name

    dataset = open_site_dataset(cfg, site)
    clusters = num_clusters(cfg, dataset)
    classes = dataset.num_classes if dataset.has_labels else None  # an unlabeled folder's classes are unknown
    preset = parse_partition_spec(cfg.partition).preset
    if preset is not None and PRESETS[preset].bounds_from_dataset_size:
        return site, SiteBounds(classes, clusters, len(dataset), len(dataset))
    partition = resolve_partition(cfg, dataset)
    name = resolve_site_name(site, partition)

    def held(ids) -> int:
        return sum(1 for image_id in set(ids) if image_id in dataset)

    return name, SiteBounds(classes, clusters, held(partition.clients.get(name, [])),
                            held(partition.validation.get(name, [])))


# ------------------------------------------------------------------------------------------- helpers


def describe(name) -> str:
    """A name for logs and audit lines: a short plain name as is, anything else shortened (a name chosen by a job
    must not carry data into the site's logs at full length)."""
    if isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and name.isprintable():
        return name
    text = repr(name)
    if len(text) <= 40:
        return text
    size = f", length {len(name)}" if hasattr(name, "__len__") else ""
    return f"{text[:32]}... ({type(name).__name__}{size})"


def _is_integer(value) -> bool:
    return (type(value) is int or isinstance(value, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(value) -> float | None:
    """A Python float for an int / float / numpy real scalar (bools are not numbers here), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if type(value) in (int, float) or isinstance(value, (np.integer, np.floating)):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _short_number(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
