"""FUSS on NVIDIA FLARE 2.9: thin adapters between FLARE objects and ``fuss_components``.

Modules
-------
``client``      Client API script (run in-process by FLARE's ``ClientAPIExecutor``) for the tasks below.
``controller``  ``FussController``, a ``ScatterAndGather`` that trains on training sites, validates on validation
                sites, records metrics / wire sizes, keeps the best model and checkpoints every round.
``aggregator``  ``FussAggregator`` (FedAvg / FedCC-kmeans / FedCC-maximin via ``fuss_components.aggregation``).
``persistor``   ``FussModelPersistor``: ``PTFileModelPersistor`` whose initial model is ``init_global_state(cfg)``.
``filters``     ``FussResultFilter``: only head parameters, centroids and declared metadata leave a site.
``job``         ``build_job`` / ``export`` / ``main``: the one Python definition of every FUSS job.

Wire format (what crosses between a site and the server)
--------------------------------------------------------
* task ``train``: server -> site: the global FussModel state dict (``head.*`` tensors + ``centroids``);
  site -> server: the same keys after local training, ``meta = {"num_samples": N_k, "site": name}`` and the
  loss terms as metrics.
* task ``validate``: server -> site: the global state dict; site -> server: metrics only (``VALIDATION_METRICS``).
* task ``site_info``: server -> site: nothing; site -> server: the site's role (training / validation site) and
  its number of training images, as metrics.
"""

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"
TASK_SITE_INFO = "site_info"
ALL_TASKS = [TASK_TRAIN, TASK_VALIDATE, TASK_SITE_INFO]

CONFIG_FILE = "fuss_config.json"
TRAINING_SITES_PROP = "fuss_training_sites"  # FLContext prop: FLARE names of the training sites (set by the controller)  # shipped in the job's custom/ folder of every app

# Declared metadata: the only `meta` keys a site's result may carry (besides FLARE's metrics slot).
META_NUM_SAMPLES = "num_samples"
META_SITE = "site"
DECLARED_META = (META_NUM_SAMPLES, META_SITE)

# Declared metric names of the validate and site_info tasks (train metrics are loss terms: any float).
VALIDATION_METRICS = ("miou", "pixel_acc", "per_class_iou", "clusters_used", "num_images")
SITE_INFO_METRICS = ("is_training_site", "is_validation_site", "num_samples")

# Parameter names of the FussModel state dict that may travel.
HEAD_PREFIX = "head."
CENTROIDS_KEY = "centroids"


def is_model_key(key: str) -> bool:
    """True for the parameter names that may leave a site: ``head.*`` and ``centroids``."""
    return key == CENTROIDS_KEY or key.startswith(HEAD_PREFIX)


def app_file(fl_ctx, name: str):
    """Path of a file shipped in the running app's ``custom/`` folder (absolute paths are returned as they are)."""
    from pathlib import Path

    from nvflare.apis.fl_constant import FLContextKey

    path = Path(name)
    if path.is_absolute():
        return path
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
    if not app_root:
        raise RuntimeError(f"cannot resolve {name!r}: the FLARE context has no app root")
    return Path(app_root) / "custom" / path


def load_job_config(fl_ctx, config_file: str = CONFIG_FILE):
    """The job's ``FussConfig`` (server side: read from the app's custom folder)."""
    from fuss_components.config import FussConfig

    return FussConfig.load(app_file(fl_ctx, config_file))


def to_torch_state(params) -> dict:
    """FLModel params (torch tensors, or numpy arrays when a job exchanges numpy) -> ``dict[str, Tensor]``."""
    import numpy as np
    import torch

    out = {}
    for key, value in (params or {}).items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu()
        elif isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            raise TypeError(f"parameter {key!r} is a {type(value).__name__}, not a tensor")
    return out
