"""Server workflow: FLARE's ``ScatterAndGather`` with FUSS's site roles, validation, metrics and checkpoints.

Per job: one ``site_info`` task to every connected client, which answers with its role (training site and/or
validation site of the partition) and its number of training images. Per round ``r``:

1. ``train`` (the global head + centroids) to the training sites only; every result is recorded as received
   (byte size of the payload, parameter names and shapes, meta keys, loss terms) and handed to the aggregator;
2. the aggregator screens and aggregates (``FussAggregator``); its accepted / rejected lists are recorded;
3. the new global model is persisted (``FL_global_model.pt``) and a resumable checkpoint is written
   (``fuss_checkpoint.pt``: model + round + history); after the last round also ``fuss_model.pt``
   (model + config, the format of ``fuss_components.runner.save_model``);
4. ``validate`` (the new global model) to the validation sites; their mIoU / pixel accuracy / per-class IoU are
   recorded and streamed to TensorBoard, and a better image-weighted mean mIoU makes it the best model
   (``FL_best_global_model.pt``);
5. ``metrics.json`` (per round, per site, best, final) is rewritten in the server app folder.

No algorithm here: aggregation is ``fuss_components.aggregation`` (through the aggregator component), training and
evaluation are ``fuss_components.site.Site`` on the sites.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from nvflare.security.logging import secure_format_exception

from fuss_components.runner import save_model
from fuss_flare import (
    CONFIG_FILE,
    META_NUM_SAMPLES,
    META_SITE,
    TASK_SITE_INFO,
    TASK_TRAIN,
    TASK_VALIDATE,
    TRAINING_SITES_PROP,
    load_job_config,
    to_torch_state,
)

METRICS_META_KEY = "initial_metrics"  # where FLModel puts a train result's metrics (MetaKey.INITIAL_METRICS)


class FussController(ScatterAndGather):
    def __init__(
        self,
        min_clients: int = 1,
        num_rounds: int = 10,
        wait_time_after_min_received: int = 0,
        aggregator_id: str = "aggregator",
        persistor_id: str = "persistor",
        shareable_generator_id: str = "shareable_generator",
        train_timeout: int = 0,
        task_check_period: float = 0.2,
        validate_every: int = 1,
        validation_timeout: int = 0,
        metrics_file: str = "metrics.json",
        checkpoint_file: str = "fuss_checkpoint.pt",
        resume_from: str = "",
        record_updates: bool = False,
        config_file: str = CONFIG_FILE,
        final_model_file: str = "fuss_model.pt",
    ):
        """Args (besides ScatterAndGather's):
        min_clients: fewest training sites the job needs (and fewest accepted updates per round; the aggregator
            enforces the latter). Every training site is asked each round and waited for.
        validate_every: validate the global model every this many rounds (and always after the last); 0 = only
            after the last round.
        metrics_file / checkpoint_file: written in the server app folder (beside ``FL_global_model.pt``).
        resume_from: a ``fuss_checkpoint.pt`` of an earlier run (absolute, or relative to the app folder):
            continue after its round with its global model, best model and history.
        record_updates: also save what the server received from every site each round (tensors included) to
            ``received/round_<r>.pt``; for tests and audits, off by default.
        config_file: the job's FussConfig JSON (server app's custom folder), saved with the final model.
        final_model_file: the final global model as ``{"model": state, "config": cfg, "rounds": R}``
            (``fuss_components.runner.save_model``), loadable by ``fuss evaluate`` / ``fuss predict``.
        """
        super().__init__(
            min_clients=min_clients,
            num_rounds=num_rounds,
            wait_time_after_min_received=wait_time_after_min_received,
            aggregator_id=aggregator_id,
            persistor_id=persistor_id,
            shareable_generator_id=shareable_generator_id,
            train_task_name=TASK_TRAIN,
            train_timeout=train_timeout,
            task_check_period=task_check_period,
        )
        self.min_clients = min_clients
        self.num_rounds = num_rounds
        self.wait_time_after_min_received = wait_time_after_min_received
        self.train_timeout = train_timeout
        self.task_check_period = task_check_period
        self.validate_every = validate_every
        self.validation_timeout = validation_timeout
        self.metrics_file = metrics_file
        self.checkpoint_file = checkpoint_file
        self.resume_from = resume_from
        self.record_updates = record_updates
        self.config_file = config_file
        self.final_model_file = final_model_file
        self._cfg = None
        self._app_dir: Path | None = None
        self._roles: dict[str, dict] = {}
        self._history: dict = {"sites": {}, "rounds": [], "best": None, "final": None}
        self._round_record: dict = {}
        self._received: dict = {}

    # ------------------------------------------------------------------ lifecycle
    def start_controller(self, fl_ctx: FLContext) -> None:
        fobs.register(TensorDecomposer)
        self._app_dir = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        self._cfg = load_job_config(fl_ctx, self.config_file)
        super().start_controller(fl_ctx)
        if self.resume_from:
            self._resume(fl_ctx)

    def _resume(self, fl_ctx: FLContext) -> None:
        path = Path(self.resume_from)
        path = path if path.is_absolute() else self._app_dir / path
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self._global_weights = make_model_learnable(ckpt["model"], {})
        self._current_round = int(ckpt["round"]) + 1
        self._history = json.loads(ckpt["history"])
        self.log_info(fl_ctx, f"resuming from {path}: rounds {self._current_round}..{self._num_rounds - 1}")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        try:
            self._control_flow(abort_signal, fl_ctx)
        except Exception as err:
            where = "during setup" if self._current_round is None else f"in round {self._current_round}"
            msg = f"FussController failed {where}: {secure_format_exception(err)}"
            self.log_exception(fl_ctx, msg)
            self._history["error"] = msg
            if self._round_record and self._round_record not in self._history["rounds"]:
                self._history["rounds"].append(self._round_record)
            if self._app_dir is not None:
                self._write_metrics()
            self.system_panic(msg, fl_ctx)

    def _control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        self._phase = AppConstants.PHASE_TRAIN
        fl_ctx.set_prop(AppConstants.PHASE, self._phase, private=True, sticky=False)
        fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self._num_rounds, private=True, sticky=False)
        train_sites, val_sites = self._discover_sites(abort_signal, fl_ctx)
        if abort_signal.triggered:
            return
        if len(train_sites) < self._min_clients or not train_sites:
            raise RuntimeError(
                f"{len(train_sites)} training site(s) {train_sites} answered, fewer than min_clients="
                f"{max(self._min_clients, 1)}; clients and roles: {self._roles}"
            )
        fl_ctx.set_prop(TRAINING_SITES_PROP, train_sites, private=True, sticky=True)
        if not val_sites:
            self.log_warning(fl_ctx, "no validation site among the clients: the global model is not validated")
        self.fire_event(AppEventType.TRAINING_STARTED, fl_ctx)
        if self._current_round is None:
            self._current_round = self._start_round
        while self._current_round < self._num_rounds:
            if self._check_abort_signal(fl_ctx, abort_signal):
                return
            r = self._current_round
            self._round_record = {"round": r, "train": {}, "accepted": [], "rejected": [], "validation": {}}
            self._received = {}
            if hasattr(self.aggregator, "last_report"):
                self.aggregator.last_report = {}
            self.log_info(fl_ctx, f"Round {r} started: training on {train_sites}")
            fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
            fl_ctx.set_prop(AppConstants.CURRENT_ROUND, r, private=True, sticky=True)
            self.fire_event(AppEventType.ROUND_STARTED, fl_ctx)

            data = self.shareable_gen.learnable_to_shareable(self._global_weights, fl_ctx)
            data.set_header(AppConstants.CURRENT_ROUND, r)
            data.set_header(AppConstants.NUM_ROUNDS, self._num_rounds)
            data.add_cookie(AppConstants.CONTRIBUTION_ROUND, r)
            task = Task(
                name=TASK_TRAIN,
                data=data,
                timeout=self._train_timeout,
                before_task_sent_cb=self._prepare_train_task_data,
                result_received_cb=self._process_train_result,
            )
            self._current_failed_clients = set()
            self._current_num_targets = len(train_sites)
            self.broadcast_and_wait(
                task=task,
                targets=train_sites,
                min_responses=len(train_sites),
                wait_time_after_min_received=self._wait_time_after_min_received,
                fl_ctx=fl_ctx,
                abort_signal=abort_signal,
            )
            if self._check_abort_signal(fl_ctx, abort_signal):
                return

            self.fire_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
            try:
                aggr_result = self.aggregator.aggregate(fl_ctx)
            finally:
                report = getattr(self.aggregator, "last_report", {}) or {}
                self._round_record["accepted"] = report.get("accepted", [])
                self._round_record["rejected"] = report.get("rejected", [])
                self._write_received(r)
            self.fire_event_with_data(
                AppEventType.AFTER_AGGREGATION, fl_ctx, AppConstants.AGGREGATION_RESULT, aggr_result
            )
            self.fire_event(AppEventType.BEFORE_SHAREABLE_TO_LEARNABLE, fl_ctx)
            self._global_weights = self.shareable_gen.shareable_to_learnable(aggr_result, fl_ctx)
            fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
            fl_ctx.sync_sticky()
            self.fire_event(AppEventType.AFTER_SHAREABLE_TO_LEARNABLE, fl_ctx)

            if self.persistor:
                self.fire_event(AppEventType.BEFORE_LEARNABLE_PERSIST, fl_ctx)
                self.persistor.save(self._global_weights, fl_ctx)
                self.fire_event(AppEventType.AFTER_LEARNABLE_PERSIST, fl_ctx)

            last = r == self._num_rounds - 1
            if val_sites and (last or (self.validate_every and (r + 1) % self.validate_every == 0)):
                self._validate(r, val_sites, abort_signal, fl_ctx)
            self._stream_round(r, fl_ctx)
            self._history["rounds"].append(self._round_record)
            if last:
                save_model(self._app_dir / self.final_model_file, to_torch_state(self._global_weights["weights"]),
                           self._cfg, rounds=self._num_rounds)
                self._history["final"] = self._final_summary(r)
            self._write_checkpoint(r)
            self._write_metrics()

            self.fire_event(AppEventType.ROUND_DONE, fl_ctx)
            self.log_info(fl_ctx, f"Round {r} finished.")
            self._current_round += 1
            self._engine.persist_components(fl_ctx, completed=False)
            self.aggregator.reset(fl_ctx)
        self._phase = AppConstants.PHASE_FINISHED
        self.log_info(fl_ctx, f"Finished FUSS training; metrics in {self._app_dir / self.metrics_file}")

    # ------------------------------------------------------------------ site roles
    def _discover_sites(self, abort_signal: Signal, fl_ctx: FLContext) -> tuple[list[str], list[str]]:
        clients = sorted(c.name for c in self._engine.get_clients())
        task = Task(name=TASK_SITE_INFO, data=DXO(DataKind.METRICS, data={}).to_shareable(), timeout=0)
        self.broadcast_and_wait(
            task=task,
            targets=clients,
            min_responses=len(clients),
            wait_time_after_min_received=0,
            fl_ctx=fl_ctx,
            abort_signal=abort_signal,
        )
        for client_task in task.client_tasks:
            name, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                rc = None if result is None else result.get_return_code()
                self.log_error(fl_ctx, f"client {name} did not report its site ({rc}), see its log; it takes no part")
                continue
            dxo = from_shareable(result)
            info = dxo.data or {}
            self._roles[name] = {
                "site": (dxo.meta or {}).get(META_SITE, name),
                "is_training_site": bool(info.get("is_training_site")),
                "is_validation_site": bool(info.get("is_validation_site")),
                "num_samples": int(info.get("num_samples", 0)),
            }
        self._history["sites"] = dict(sorted(self._roles.items()))
        train = sorted(n for n, r in self._roles.items() if r["is_training_site"])
        val = sorted(n for n, r in self._roles.items() if r["is_validation_site"])
        self.log_info(fl_ctx, f"site roles: {self._roles}")
        return train, val

    # ------------------------------------------------------------------ train results
    def _process_train_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        name, result = client_task.client.name, client_task.result
        entry = {"return_code": str(result.get_return_code(ReturnCode.OK))}
        try:
            dxo = from_shareable(result)
            params = dxo.data or {}
            meta = dxo.meta or {}
            entry.update(
                bytes=len(fobs.dumps(result.get("DXO"))),
                param_bytes=int(sum(getattr(v, "nbytes", 0) for v in params.values())),
                param_keys=sorted(params),
                param_shapes={k: list(getattr(v, "shape", ())) for k, v in params.items()},
                meta_keys=sorted(meta),
                site=meta.get(META_SITE),
                num_samples=meta.get(META_NUM_SAMPLES),
                metrics={k: float(v) for k, v in (meta.get(METRICS_META_KEY) or {}).items()},
            )
            if self.record_updates:
                self._received[name] = {"params": to_torch_state(params), "meta": json.dumps(meta, default=str)}
        except Exception as err:  # recorded, then the aggregator decides
            entry["error"] = f"unreadable result: {err}"
        self._round_record["train"][name] = entry
        super()._process_train_result(client_task, fl_ctx)

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ) -> None:
        self.log_warning(fl_ctx, f"ignored a late result of task {task_name} from {client.name}")

    # ------------------------------------------------------------------ validation
    def _validate(self, r: int, val_sites: list[str], abort_signal: Signal, fl_ctx: FLContext) -> None:
        data = self.shareable_gen.learnable_to_shareable(self._global_weights, fl_ctx)
        data.set_header(AppConstants.CURRENT_ROUND, r)
        data.set_header(AppConstants.NUM_ROUNDS, self._num_rounds)
        task = Task(name=TASK_VALIDATE, data=data, timeout=self.validation_timeout)
        self.broadcast_and_wait(
            task=task,
            targets=val_sites,
            min_responses=len(val_sites),
            wait_time_after_min_received=0,
            fl_ctx=fl_ctx,
            abort_signal=abort_signal,
        )
        results = {}
        for client_task in task.client_tasks:
            name, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                self.log_error(fl_ctx, f"round {r}: validation on {name} failed")
                continue
            results[name] = dict(from_shareable(result).data or {})
        self._round_record["validation"] = results
        if not results:  # never index an empty result list
            self.log_warning(fl_ctx, f"round {r}: no validation result")
            return
        weights = {n: float(m.get("num_images") or 1) for n, m in results.items()}
        total = sum(weights.values())
        for key in ("miou", "pixel_acc"):
            self._round_record[f"val_{key}"] = sum(weights[n] * float(m[key]) for n, m in results.items()) / total
        miou = self._round_record["val_miou"]
        best = self._history.get("best")
        if best is None or miou > best["miou"]:
            self._history["best"] = {"round": r, "miou": miou, "pixel_acc": self._round_record["val_pixel_acc"]}
            self.fire_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
            self.log_info(fl_ctx, f"round {r}: new best global model, validation mIoU {miou:.4f}")

    # ------------------------------------------------------------------ outputs
    def _stream_round(self, r: int, fl_ctx: FLContext) -> None:
        rec = self._round_record
        values = {f"global/{k}": rec[k] for k in ("val_miou", "val_pixel_acc") if k in rec}
        values["global/accepted_clients"] = len(rec["accepted"])
        values["global/rejected_clients"] = len(rec["rejected"])
        for name, entry in rec["train"].items():
            if "bytes" in entry:
                values[f"wire/{name}_bytes"] = entry["bytes"]
        for tag, value in values.items():
            dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=r)
            send_analytic_dxo(self, dxo, fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def _final_summary(self, r: int) -> dict:
        rec = self._round_record
        return {
            "round": r,
            "val_miou": rec.get("val_miou"),
            "val_pixel_acc": rec.get("val_pixel_acc"),
            "validation": rec.get("validation", {}),
            "global_model": str(self._app_dir / self.final_model_file),
            "best_model": str(self._app_dir / "FL_best_global_model.pt") if self._history.get("best") else None,
        }

    def _write_metrics(self) -> None:
        _atomic_write(self._app_dir / self.metrics_file, json.dumps(self._history, indent=2, default=str).encode())

    def _write_checkpoint(self, r: int) -> None:
        ckpt = {
            "round": r,
            "model": to_torch_state(self._global_weights["weights"]),
            "history": json.dumps(self._history, default=str),
        }
        _atomic_torch_save(ckpt, self._app_dir / self.checkpoint_file)

    def _write_received(self, r: int) -> None:
        if self.record_updates and self._received:
            _atomic_torch_save(self._received, self._app_dir / "received" / f"round_{r}.pt")

    # ------------------------------------------------------------------ FLARE snapshot (server restart)
    def get_persist_state(self, fl_ctx: FLContext) -> dict:
        state = super().get_persist_state(fl_ctx)
        state["fuss_history"] = json.dumps(self._history, default=str)
        return state

    def restore(self, state_data: dict, fl_ctx: FLContext):
        super().restore(state_data, fl_ctx)
        if state_data.get("fuss_history"):
            self._history = json.loads(state_data["fuss_history"])


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
