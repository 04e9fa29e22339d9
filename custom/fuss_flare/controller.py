"""Server workflow: FLARE's ``ScatterAndGather`` round loop, with a site census before it and a final validation
after it. Public FLARE API (the constructor arguments of ``ScatterAndGather``, ``broadcast_and_wait``, the
FLContext and events) and one private step of ``ScatterAndGather``, ``_accept_train_result``: the only place that
knows which client's session delivered a result (see ``SESSION_CLIENT_HEADER``; a test pins its signature).

1. ``site_info`` to every client: each answers with its role (training and/or validation site of the partition)
   and its number of training images. The counts are published for the aggregator (``DECLARED_COUNTS_PROP``: an
   update may never claim more images than its site declared here) and the roles for the recorder.
2. ``ScatterAndGather``'s rounds, unchanged: ``train`` to every site; validation sites evaluate the global model
   they receive and answer with a zero-weight result (see ``fuss_flare.executor``).
3. ``validate`` of the final global model on the validation sites (the rounds validate the model of the round
   before), published as ``FINAL_VALIDATION`` for the recorder.
"""

from __future__ import annotations

from nvflare.apis.controller_spec import Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from fuss_components import wire
from fuss_flare import (
    DECLARED_COUNTS_PROP,
    ERROR_PROP,
    JOB_FAILED,
    FINAL_VALIDATION,
    SESSION_CLIENT_HEADER,
    SITE_CENSUS,
    SITE_ROLES_PROP,
    TASK_SITE_INFO,
    TASK_TRAIN,
    TASK_VALIDATE,
    VALIDATION_RESULTS_PROP,
)


def read_site_info(result: Shareable) -> dict:
    """A site's ``site_info`` answer -> ``{"is_training_site", "is_validation_site", "num_samples"}``. Roles are
    True only when the site said True (or 1.0, as metrics travel); ``num_samples`` must be a whole number of images
    in 0..2**53 - 1 (``wire.whole_count``; a bool is not one). Raises on anything else."""
    info = dict(from_shareable(result).data or {})
    count, problem = wire.whole_count(info.get("num_samples", 0), 2**53 - 1)
    if problem:
        raise ValueError(f"num_samples {info.get('num_samples')!r} is not a whole number of images ({problem})")
    return {"is_training_site": info.get("is_training_site") is True or info.get("is_training_site") == 1.0,
            "is_validation_site": info.get("is_validation_site") is True or info.get("is_validation_site") == 1.0,
            "num_samples": count}


class FussController(ScatterAndGather):
    def __init__(self, min_clients: int = 1, min_training_sites: int = 1, num_rounds: int = 10, start_round: int = 0,
                 train_timeout: int = 0, validation_timeout: int = 0, task_check_period: float = 0.2):
        """Args:
        min_clients: the sites the job runs on (training and validation-only); every round waits for all of them.
        min_training_sites: fewer training sites answering the census stops the job before any work (e.g. a site
            started with a wrong data path), naming the sites that did not answer.
        num_rounds: rounds to run, from ``start_round`` (a resumed job starts after its checkpoint's round).
        train_timeout / validation_timeout: seconds a site may take per task (0: no limit).
        """
        super().__init__(min_clients=min_clients, num_rounds=num_rounds, start_round=start_round,
                         wait_time_after_min_received=0, aggregator_id="aggregator", persistor_id="persistor",
                         shareable_generator_id="shareable_generator", train_task_name=TASK_TRAIN,
                         train_timeout=train_timeout, ignore_result_error=True, task_check_period=task_check_period)
        self.validation_timeout = validation_timeout
        self.min_training_sites = min_training_sites

    def start_controller(self, fl_ctx: FLContext) -> None:
        fobs.register(TensorDecomposer)
        super().start_controller(fl_ctx)

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        # FLARE has checked that this client's session was given the task; the result's own identity is the
        # client's claim, so the aggregator keys results by this stamp (it replaces any the client wrote)
        result.set_header(SESSION_CLIENT_HEADER, client_name)
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        roles = self._census(abort_signal, fl_ctx)
        if not roles or abort_signal.triggered:
            return
        super().control_flow(abort_signal, fl_ctx)
        validation_sites = sorted(n for n, r in roles.items() if r["is_validation_site"])
        if validation_sites and not abort_signal.triggered:
            self._final_validation(validation_sites, abort_signal, fl_ctx)

    def _census(self, abort_signal: Signal, fl_ctx: FLContext) -> dict[str, dict]:
        task = Task(name=TASK_SITE_INFO, data=DXO(DataKind.METRICS, data={}).to_shareable(), timeout=0)
        self.broadcast_and_wait(task=task, min_responses=self._expected_sites(fl_ctx), fl_ctx=fl_ctx,
                                abort_signal=abort_signal)
        roles = {}
        for client_task in task.client_tasks:
            name, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                self.log_error(fl_ctx, f"site {name} did not report its role (see its log); it takes no part")
                continue
            try:  # a site's answer is untrusted: anything malformed leaves that site out, never the job
                roles[name] = read_site_info(result)
            except Exception as err:
                self.log_error(fl_ctx, f"site {name} sent an unusable site_info ({err}); it takes no part")
        self.log_info(fl_ctx, f"site roles: {roles}")
        training = {n: r["num_samples"] for n, r in roles.items() if r["is_training_site"]}
        if len(training) < max(1, self.min_training_sites):
            missing = sorted(c.name for c in fl_ctx.get_engine().get_clients() if c.name not in roles)
            self._fail(f"{len(training)} training site(s) {sorted(training)} answered site_info, fewer than "
                       f"min_clients={max(1, self.min_training_sites)}; no usable answer from {missing} (see their "
                       f"logs)", fl_ctx)
            return {}
        fl_ctx.set_prop(DECLARED_COUNTS_PROP, training, private=True, sticky=True)
        fl_ctx.set_prop(SITE_ROLES_PROP, roles, private=True, sticky=True)
        self.fire_event(SITE_CENSUS, fl_ctx)
        return roles

    def _fail(self, reason: str, fl_ctx: FLContext) -> None:
        fl_ctx.set_prop(ERROR_PROP, reason, private=True, sticky=False)
        self.fire_event(JOB_FAILED, fl_ctx)
        self.system_panic(reason, fl_ctx)

    def _expected_sites(self, fl_ctx: FLContext) -> int:
        return max(1, len(fl_ctx.get_engine().get_clients()))

    def _final_validation(self, sites: list[str], abort_signal: Signal, fl_ctx: FLContext) -> None:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        data = self.shareable_gen.learnable_to_shareable(model, fl_ctx)
        last = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        data.set_header(AppConstants.CURRENT_ROUND, (last or 0) + 1)
        task = Task(name=TASK_VALIDATE, data=data, timeout=self.validation_timeout)
        self.broadcast_and_wait(task=task, targets=sites, min_responses=len(sites), fl_ctx=fl_ctx,
                                abort_signal=abort_signal)
        results = {}
        for client_task in task.client_tasks:
            name, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                self.log_error(fl_ctx, f"final validation on {name} failed (see its log)")
                continue
            results[name] = dict(from_shareable(result).data or {})
        fl_ctx.set_prop(VALIDATION_RESULTS_PROP, results, private=True, sticky=False)
        self.fire_event(FINAL_VALIDATION, fl_ctx)
