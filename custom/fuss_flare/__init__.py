"""FUSS on NVIDIA FLARE 2.9: thin adapters between FLARE objects and ``fuss_components``.

Installed on every site and on the server (``pip install`` of this project); a job carries configuration only
(``config/config_fed_*.json`` naming these classes, and ``config/fuss_config.json``), so the code a site runs is
the code the site installed. Modules:

``executor``    ``FussExecutor``: the site's tasks ``site_info``, ``train``, ``validate``.
``controller``  ``FussController``: FLARE's ``ScatterAndGather`` with a site census before and a final validation.
``aggregator``  ``FussAggregator``: screening and FedAvg / FedCC through ``fuss_components.aggregation``.
``recorder``    ``FussRecorder``: metrics, checkpoint, final and best model, from FLARE's round events.
``persistor``   ``FussModelPersistor``: ``PTFileModelPersistor`` whose initial model is the seeded FUSS model.
``filters``     the site's privacy filters: what may leave a site is checked against a schema.
``job``         the one Python definition of every FUSS job, and the generator of ``jobs/``.

Wire format (keyed on the server by the client of the FLARE session that delivered it, ``SESSION_CLIENT_HEADER``):

* ``train``: server -> site: the global state dict (``head.*`` + ``centroids``); site -> server: the same keys
  after local training, ``meta = {"num_samples": N, "site": <its FLARE name>, "initial_metrics": {...}}`` with the
  loss terms, and the validation metrics of the received model on a validation site; a validation-only site
  sends no parameters and ``num_samples = 0``.
* ``validate`` (the final model): site -> server: validation metrics only.
* ``site_info``: site -> server: its role and number of training images, as metrics.
"""

from fuss_components.wire import META_NUM_SAMPLES, META_SITE  # noqa: E402  the wire contract, defined once
from fuss_components.wire import SITE_INFO_RESULT as TASK_SITE_INFO  # noqa: E402
from fuss_components.wire import TRAIN_RESULT as TASK_TRAIN  # noqa: E402
from fuss_components.wire import VALIDATE_RESULT as TASK_VALIDATE  # noqa: E402

ALL_TASKS = [TASK_TRAIN, TASK_VALIDATE, TASK_SITE_INFO]

CONFIG_FILE = "fuss_config.json"
SITE_CONFIG_ENV = "FUSS_SITE_CONFIG"  # a site's own overrides (JSON of dotted keys), e.g. its data root
SITE_PLACEHOLDER = "{site}"  # in a value of those overrides: the site's FLARE client name

# Server-side FLContext properties and events between the FUSS components (FLARE's public event mechanism).
SITE_CENSUS = "fuss.site_census"  # fired by the controller after site_info
SITE_ROLES_PROP = "fuss.site_roles"  # {client: {"is_training_site", "is_validation_site", "num_samples"}}
DECLARED_COUNTS_PROP = "fuss.declared_counts"  # {training client: images it declared at site_info}
SCREENING_DONE = "fuss.screening_done"  # fired by the aggregator after screening a round
SCREENING_REPORT = "fuss.screening_report"  # {"accepted": [...], "rejected": [[client, reason], ...]}
FINAL_VALIDATION = "fuss.final_validation"  # fired by the controller after validating the final model
VALIDATION_RESULTS_PROP = "fuss.validation_results"  # {client: validation metrics}
JOB_FAILED = "fuss.job_failed"  # fired before a FUSS component stops the job; the reason in ERROR_PROP
ERROR_PROP = "fuss.error"
# Stamped by FussController on every train result before FussAggregator sees it: the client of the FLARE session
# that delivered it. A result's peer identity is the client's own claim (FLARE copies it from the client's context).
SESSION_CLIENT_HEADER = "fuss.session_client"


def app_file(fl_ctx, name: str):
    """Path of a configuration file in the running app's ``config/`` folder (absolute paths are returned as they
    are). Jobs carry configuration only: a ``custom/`` folder would make the job BYOC (custom code)."""
    from pathlib import Path

    from nvflare.apis.fl_constant import FLContextKey

    path = Path(name)
    if path.is_absolute():
        return path
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
    if not app_root:
        raise RuntimeError(f"cannot resolve {name!r}: the FLARE context has no app root")
    return Path(app_root) / "config" / path


def load_job_config(fl_ctx, config_file: str = CONFIG_FILE):
    """The job's ``FussConfig`` (``<app>/config/fuss_config.json``)."""
    from fuss_components.config import FussConfig

    return FussConfig.load(app_file(fl_ctx, config_file))


def load_site_config(fl_ctx, config_file: str = CONFIG_FILE, notes: list | None = None):
    """The job's ``FussConfig`` as this site runs it: with the overrides of the JSON file named by
    ``$FUSS_SITE_CONFIG`` (dotted keys, e.g. ``{"data.root": "/data/fuss", "cache_dir": "/scratch/fuss"}``).

    ``{site}`` in a string value is replaced by this site's FLARE client name, so one file can serve several
    sites that share an environment (the simulator's sites): ``{"data.root": "/data", "data.dataset": "{site}",
    "partition": "site"}`` gives the site ``site-1`` the image folder ``/data/site-1``. The keys the site's
    policy owns (``site_owned``; ``fuss_components.disclosure.site_config``) never take the job's value: the
    job's ignored values are appended to ``notes`` (for the audit log); a job that sets one the site has not
    set raises ``DisclosureError``."""
    import json
    import os
    from pathlib import Path

    from fuss_components.config import ConfigError
    from fuss_components.disclosure import site_config

    cfg = load_job_config(fl_ctx, config_file)
    site = fl_ctx.get_identity_name()
    overrides_file = os.environ.get(SITE_CONFIG_ENV)
    overrides = json.loads(Path(overrides_file).read_text()) if overrides_file else {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{overrides_file} (${SITE_CONFIG_ENV}) must hold a JSON object of dotted keys")
    for key, value in overrides.items():
        if isinstance(value, str) and SITE_PLACEHOLDER in value:
            if not site:
                raise ConfigError(f"{overrides_file}: {key} uses {SITE_PLACEHOLDER}, but the FLARE context names "
                                  f"no site")
            overrides[key] = value.replace(SITE_PLACEHOLDER, site)
    cfg, ignored = site_config(cfg, overrides, load_site_policy(fl_ctx), site)
    if notes is not None:
        notes.extend(ignored)
    return cfg


def load_site_policy(fl_ctx):
    """This site's disclosure policy (``fuss_components.disclosure.site_policy``): ``$FUSS_SITE_POLICY``, else
    ``<this participant's workspace>/local/fuss_policy.json``, else the defaults. Never the job's."""
    from fuss_components.disclosure import site_policy

    engine = fl_ctx.get_engine() if fl_ctx is not None else None
    workspace = engine.get_workspace() if engine is not None else None
    return site_policy(workspace.get_site_config_dir() if workspace is not None else None)


def to_torch_state(params) -> dict:
    """DXO data (torch tensors, or numpy arrays when a job exchanges numpy) -> ``dict[str, Tensor]``."""
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


def weights_shareable(state: dict):
    """A full model state as FLARE's WEIGHTS DXO in a Shareable."""
    from nvflare.apis.dxo import DXO, DataKind

    return DXO(DataKind.WEIGHTS, data=state).to_shareable()
