"""FUSS site: a FLARE ``Executor`` for the tasks ``site_info``, ``train`` and ``validate``.

Installed on the site (``pip install`` of this project), never shipped with a job: the job names the class
``fuss_flare.executor.FussExecutor`` and carries only configuration. The site is
``fuss_components.site.Site(cfg, <FLARE client name>)``: images and features never leave it.

``train`` follows NVFlare's hello-pt clients: a site first evaluates the global model it received (when it has
validation images), then trains on it (when it has training images). A validation-only site therefore answers
with no parameters, ``num_samples = 0`` and its validation metrics: a zero-weight result that the aggregator
records and does not average. Configuration: the job's ``config/fuss_config.json``, then optional site-local
overrides from the JSON file named by ``$FUSS_SITE_CONFIG`` (dotted keys, e.g. ``{"data.root": "/data/fuss"}``;
``{site}`` in a value becomes the FLARE client name, see ``fuss_flare.load_site_config``).
"""

from __future__ import annotations

import os

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.apis.utils.fl_context_utils import add_job_audit_event
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from nvflare.widgets.info_collector import InfoCollector

from fuss_flare import (
    CONFIG_FILE,
    META_NUM_SAMPLES,
    META_SITE,
    TASK_SITE_INFO,
    TASK_TRAIN,
    TASK_VALIDATE,
    load_site_config,
    load_site_policy,
    to_torch_state,
)


class FussExecutor(Executor):
    def __init__(self, config_file: str = CONFIG_FILE, threads: int = 0):
        """Args:
        config_file: the job's FussConfig JSON in the app's ``config/`` folder.
        threads: CPU threads for torch and BLAS on this site; 0 = ``$OMP_NUM_THREADS`` when the site sets it,
            else all cores, or in the FLARE simulator (every site on one machine) the cores divided by the number
            of sites the job deploys to.
        """
        super().__init__()
        self.config_file = config_file
        self.threads = threads
        self._site = None
        self._last: dict = {}  # the last task's round and metrics, for the admin console's show_stats

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            fobs.register(TensorDecomposer)
            _limit_threads(self.threads or _fair_share(fl_ctx))
        elif event_type == InfoCollector.EVENT_TYPE_GET_STATS:  # show_stats <job> client
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR)
            if collector is not None:
                collector.add_info("FussExecutor", self.stats())

    def stats(self) -> dict:
        """The site's role, images and device, and its last round's metrics (losses, seconds, validation)."""
        site = self._site
        if site is None:
            return {"state": "not started"}
        role = " and ".join(r for r, on in (("training", site.is_training_site),
                                            ("validation", site.is_validation_site)) if on)
        return {"site": site.name, "role": role, "train_images": len(site.train_ids),
                "validation_images": len(site.validation_ids), "device": str(site.device), **self._last}

    def site(self, fl_ctx: FLContext):
        if self._site is None:
            from fuss_components.site import Site

            ignored: list[str] = []  # the job's values of keys this site owns
            cfg = load_site_config(fl_ctx, self.config_file, notes=ignored)
            for line in ignored:
                self.log_warning(fl_ctx, f"FussExecutor: {line}")
                add_job_audit_event(fl_ctx=fl_ctx, msg=f"FussExecutor: {line}")
            self._site = Site(cfg, fl_ctx.get_identity_name(), policy=load_site_policy(fl_ctx))
            # FLARE's GPUResourceConsumer (or the simulator's -gpu, or the site) chose the visible GPU
            self.log_info(fl_ctx, f"FUSS site {self._site.name}: device {self._site.device} "
                                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return self._site

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        from fuss_components.disclosure import DisclosureError

        name = fl_ctx.get_identity_name()
        try:
            site = self.site(fl_ctx)
            site.check_policy()  # a job beyond the site's disclosure policy is refused before any work
            if task_name == TASK_SITE_INFO:
                info = {"is_training_site": float(site.is_training_site),
                        "is_validation_site": float(site.is_validation_site),
                        "num_samples": float(site.num_samples)}
                return DXO(DataKind.METRICS, data=info, meta={META_SITE: name}).to_shareable()
            global_state = to_torch_state(from_shareable(shareable).data)
            round_idx = int(shareable.get_header(AppConstants.CURRENT_ROUND) or 0)
            if task_name == TASK_VALIDATE:
                scores = self._validate(site, global_state, round_idx, fl_ctx)
                self._last = {"round": round_idx, "metrics": scores}
                return DXO(DataKind.METRICS, data=scores, meta={META_SITE: name}).to_shareable()
            if task_name != TASK_TRAIN:
                self.log_error(fl_ctx, f"FUSS site {name}: unknown task {task_name!r}")
                return make_reply(ReturnCode.TASK_UNKNOWN)
            metrics = self._validate(site, global_state, round_idx, fl_ctx) if site.is_validation_site else {}
            state, num_samples = {}, 0
            if site.is_training_site and not abort_signal.triggered:
                result = site.train(global_state, round_idx)
                state, num_samples = result.state, int(result.num_samples)
                if result.release is not None:
                    msg = f"FussExecutor: round {round_idx}: {result.release.describe(site.policy)}"
                    self.log_info(fl_ctx, msg)
                    add_job_audit_event(fl_ctx=fl_ctx, msg=msg)
                for key, value in result.metrics.items():
                    metrics[key] = float(value)
                    self._stream(f"train/{key}", value, round_idx, fl_ctx)
            self._last = {"round": round_idx, "metrics": dict(metrics)}  # the finished task's
            meta = {META_NUM_SAMPLES: num_samples, META_SITE: name, MetaKey.INITIAL_METRICS: metrics}
            return DXO(DataKind.WEIGHTS, data=state, meta=meta).to_shareable()
        except DisclosureError as err:  # the job asked for more than this site discloses: said once per task
            self.log_error(fl_ctx, f"FUSS site {name}: task {task_name!r} refused: {err}")
            add_job_audit_event(fl_ctx=fl_ctx, msg=f"FussExecutor: task {task_name} refused: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        except Exception as err:  # the site's log has the traceback; the server gets an error code only
            self.log_exception(fl_ctx, f"FUSS site {name}: task {task_name!r} failed: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _validate(self, site, global_state, round_idx: int, fl_ctx: FLContext) -> dict:
        """Validation metrics of the received global model (it is the aggregate of the round before)."""
        from fuss_components.wire import VALIDATION_METRICS

        scores = site.validate(global_state)
        out = {k: scores[k] for k in VALIDATION_METRICS if k in scores}
        out["per_class_iou"] = [float(v) for v in out.get("per_class_iou", [])]
        for key in ("miou", "pixel_acc", "clusters_used"):
            if key in out:
                out[key] = float(out[key])
                if round_idx > 0:  # TensorBoard step: the round that produced the model (none for the initial one)
                    self._stream(f"val/{key}", out[key], round_idx - 1, fl_ctx)
        return out

    def _stream(self, tag: str, value: float, step: int, fl_ctx: FLContext) -> None:
        dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=step)
        send_analytic_dxo(self, dxo, fl_ctx, event_type=ANALYTIC_EVENT_TYPE)


def _fair_share(fl_ctx: FLContext) -> int:
    """$OMP_NUM_THREADS if set; else all cores on a real site, and in the simulator the cores over the job's
    sites (they share one machine)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the site's own choice wins
        return int(os.environ["OMP_NUM_THREADS"])
    cores = os.cpu_count() or 1
    if not fl_ctx.get_prop(FLContextKey.SIMULATE_MODE):
        return cores
    meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
    sites = {s for names in (meta.get("deploy_map") or {}).values() for s in names
             if s.lower() not in ("server", "@all")}
    return max(1, cores // max(1, len(sites) or cores))


def _limit_threads(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(max(1, threads))
    threadpool_limits(max(1, threads))
