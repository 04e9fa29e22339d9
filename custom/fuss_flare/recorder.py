"""Server widget that records a FUSS run from FLARE's round events: ``metrics.json``, a resumable checkpoint, the
final model, the best model (by validation mIoU) and the global TensorBoard scalars.

Per round ``r`` of ``metrics.json``: what each site sent (bytes, parameter names and shapes, sample count, loss
terms; keyed by FLARE's authenticated client name), the accepted / rejected updates with reasons, and the
validation of the global model after round ``r`` (validation sites evaluate the model they receive, so round
``r``'s model is validated in round ``r + 1``, the last one by the controller's final validation; ``initial``
holds the initial model's), and ``drift``: how far the accepted sites' centroids drifted apart in round ``r`` and
how far FedAvg's and FedCC's centroids of them differ (``fuss_components.aggregation.centroid_drift``). A better
image-weighted mean validation mIoU fires FLARE's ``GLOBAL_BEST_MODEL_AVAILABLE``, and the persistor saves the
validated model as ``FL_best_global_model.pt``.

With ``export_format`` set, the end of the run also writes the final model's deployable export (``fuss export``)
beside it; ``metrics.json``'s ``final.export`` names its files, or the error of a failed export.

Label-free criteria (``fuss_components.selection``): the training sites measure the global model they receive, so
the criteria sent in round ``r + 1`` are those of round ``r``'s model. They are filed beside that model's validation:
``rounds[r]["selection"]`` (``initial["selection"]`` for the initial model) is ``{criterion: mean}`` over the
training sites, weighted by the images each declared in the census; the last round's model has none (no round
follows it). With ``selection_criterion`` set, a better value of that criterion saves the measured model as
``FL_selected_model.pt`` (the persistor's format, ``{"model": state}``) and ``metrics.json``'s ``selected`` names
its round; no label takes part in that choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.utils import fobs
from nvflare.widgets.info_collector import InfoCollector
from nvflare.widgets.widget import Widget

from fuss_components.config import EXPORT_FORMATS
from fuss_components.export import CARD_FILE, export_model
from fuss_components.metrics import image_weighted_mean
from fuss_components.files import atomic_torch_save, atomic_write_bytes
from fuss_components.checkpoint import save_model
from fuss_components.selection import CRITERIA as SELECTION_CRITERIA, better, weighted_criteria
from fuss_components.wire import VALIDATION_METRICS
from fuss_flare import (
    CONFIG_FILE,
    ERROR_PROP,
    JOB_FAILED,
    FINAL_VALIDATION,
    META_NUM_SAMPLES,
    SCREENING_DONE,
    SCREENING_REPORT,
    SESSION_CLIENT_HEADER,
    SITE_CENSUS,
    SITE_ROLES_PROP,
    VALIDATION_RESULTS_PROP,
    load_job_config,
    to_torch_state,
)


class FussRecorder(Widget):
    def __init__(self, config_file: str = CONFIG_FILE, metrics_file: str = "metrics.json",
                 checkpoint_file: str = "fuss_checkpoint.pt", final_model_file: str = "fuss_model.pt",
                 resume_from: str = "", record_updates: bool = False, export_format: str | None = None,
                 selection_criterion: str | None = None, selected_model_file: str = "FL_selected_model.pt"):
        """Args (files are written in the server app folder):
        metrics_file: per round, per site, best, final (JSON).
        checkpoint_file: ``{"model", "round", "history"}`` after every round; ``fuss job export --resume-from``.
        final_model_file: the last global model with its config (``fuss evaluate`` / ``fuss predict``).
        resume_from: the checkpoint this run resumes; its history is continued.
        record_updates: also save every received update (tensors) to ``received/round_<r>.pt`` (audits, tests).
        export_format: "torchscript" or "onnx": at the end of the run, export the final model beside it
            (``fuss_segmenter.pt`` / ``fuss_segmenter.onnx`` + ``fuss_segmenter.json``, as ``fuss export``); the
            server then needs the backbone weights. None (default): no export. A failed export is logged and
            recorded; the final model stays.
        selection_criterion: one of ``fuss_components.selection.CRITERIA``: keep the global model with the best
            value of that label-free criterion as ``selected_model_file`` (module docstring). None (default): off.
        """
        super().__init__()
        self.config_file = config_file
        self.metrics_file = metrics_file
        self.checkpoint_file = checkpoint_file
        self.final_model_file = final_model_file
        self.resume_from = resume_from
        self.record_updates = record_updates
        if export_format is not None and export_format not in EXPORT_FORMATS:
            raise ValueError(f"FussRecorder: export_format must be one of {', '.join(EXPORT_FORMATS)} or null, got "
                             f"{export_format!r}")
        self.export_format = export_format
        if selection_criterion is not None and selection_criterion not in SELECTION_CRITERIA:
            raise ValueError(f"FussRecorder: selection_criterion must be one of {', '.join(SELECTION_CRITERIA)} or "
                             f"null, got {selection_criterion!r}")
        self.selection_criterion = selection_criterion
        self.selected_model_file = selected_model_file
        self._final_model: Path | None = None  # written by this run (a resumed history may name an older one)
        self._cfg = None
        self._app_dir: Path | None = None
        self._history: dict = {"sites": {}, "initial": None, "rounds": [], "best": None, "final": None}
        self._record: dict | None = None
        self._validation: dict = {}
        self._received: dict = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        handler = {
            EventType.START_RUN: self._start,
            SITE_CENSUS: self._census,
            AppEventType.ROUND_STARTED: self._round_started,
            AppEventType.BEFORE_CONTRIBUTION_ACCEPT: self._received_result,
            AppEventType.BEFORE_AGGREGATION: self._validated,
            SCREENING_DONE: self._screened,
            AppEventType.ROUND_DONE: self._round_done,
            FINAL_VALIDATION: self._final_validation,
            JOB_FAILED: self._failed,
            EventType.END_RUN: self._end,
            InfoCollector.EVENT_TYPE_GET_STATS: self._report_stats,
        }.get(event_type)
        if handler is not None:
            handler(fl_ctx)

    def _report_stats(self, fl_ctx: FLContext) -> None:
        """The admin console's ``show_stats <job> server`` (FLARE's InfoCollector): group ``FussRecorder``."""
        collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR)
        if collector is not None:
            collector.add_info("FussRecorder", self.stats())

    def stats(self) -> dict:
        """Where the run stands: the round in progress and the sites that answered it, the last finished round's
        accepted and rejected updates (with the reasons), the last validation and the best round."""
        done = self._history["rounds"]
        validated = next((r for r in reversed(done) if "val_miou" in r), None) or self._history.get("initial") or {}
        out = {"sites": {name: " and ".join(r for r in ("training", "validation") if role.get(f"is_{r}_site"))
                               + f" site, {int(role.get('num_samples', 0))} training images"
                         for name, role in self._history["sites"].items()},
               "rounds_done": len(done),
               "round_in_progress": self._record["round"] if self._record is not None else None,
               "answered_this_round": sorted(self._record["train"]) if self._record is not None else [],
               "val_miou": validated.get("val_miou"), "val_pixel_acc": validated.get("val_pixel_acc"),
               "validated_round": validated.get("round", "initial" if validated else None),
               "best": self._history.get("best")}
        if done:
            last = done[-1]
            out["last_round"] = {"round": last["round"], "accepted": last.get("accepted", []),
                                 "rejected": {site: reason for site, reason in last.get("rejected", [])}}
        return out

    # ------------------------------------------------------------------ events
    def _start(self, fl_ctx: FLContext) -> None:
        self._app_dir = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        self._cfg = load_job_config(fl_ctx, self.config_file)
        if self.resume_from:
            ckpt = torch.load(self.resume_from, map_location="cpu", weights_only=True)
            self._history = json.loads(ckpt["history"])

    def _census(self, fl_ctx: FLContext) -> None:
        self._history["sites"] = dict(sorted((fl_ctx.get_prop(SITE_ROLES_PROP) or {}).items()))

    def _round_started(self, fl_ctx: FLContext) -> None:
        r = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self._record = {"round": r, "train": {}, "accepted": [], "rejected": [], "validation": {}}
        self._validation, self._received = {}, {}

    def _received_result(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        # the client of the session that delivered it (FussController's stamp), as the aggregator keys it
        name = result.get_header(SESSION_CLIENT_HEADER) or fl_ctx.get_peer_context().get_identity_name(default="?")
        entry: dict = {}
        try:
            dxo = from_shareable(result)
            params, meta = dxo.data or {}, dxo.meta or {}
            metrics = dict(meta.get(MetaKey.INITIAL_METRICS) or {})
            entry.update(bytes=len(fobs.dumps(dxo)), param_keys=sorted(params),
                         param_bytes=int(sum(getattr(v, "nbytes", 0) for v in params.values())),
                         meta_keys=sorted(meta),
                         param_shapes={k: list(getattr(v, "shape", ())) for k, v in params.items()},
                         num_samples=meta.get(META_NUM_SAMPLES),
                         metrics={k: v for k, v in metrics.items() if k not in VALIDATION_METRICS})
            if "miou" in metrics:
                self._validation[name] = {k: metrics[k] for k in VALIDATION_METRICS if k in metrics}
            if self.record_updates and params:
                self._received[name] = {"params": to_torch_state(params), "meta": json.dumps(meta, default=str)}
        except Exception as err:  # recorded; the aggregator rejects it with its reason
            entry["error"] = f"unreadable result: {err}"
        if self._record is not None:
            self._record["train"][name] = entry

    def _validated(self, fl_ctx: FLContext) -> None:
        """The validation sites' scores and the training sites' label-free criteria of the model they received:
        the previous round's (or the initial)."""
        target = self._history["rounds"][-1] if self._history["rounds"] else None
        if self._validation:
            self._attach_validation(target, self._validation, fl_ctx)
        self._attach_selection(target, fl_ctx)

    def _screened(self, fl_ctx: FLContext) -> None:
        report = fl_ctx.get_prop(SCREENING_REPORT) or {}
        if self._record is not None:
            self._record["accepted"] = report.get("accepted", [])
            self._record["rejected"] = report.get("rejected", [])
            if report.get("drift"):
                self._record["drift"] = report["drift"]
                drift = {f"global/drift_{k}": v for k, v in report["drift"].items()}
                self._stream(drift, self._record["round"], fl_ctx)

    def _round_done(self, fl_ctx: FLContext) -> None:
        record, r = self._record, fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self._history["rounds"].append(record)
        self._record = None
        state = to_torch_state(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)["weights"])
        if self._received:
            atomic_torch_save(self._received, self._app_dir / "received" / f"round_{r}.pt")
        last = fl_ctx.get_prop(AppConstants.START_ROUND, 0) + fl_ctx.get_prop(AppConstants.NUM_ROUNDS, 0) - 1
        if r >= last:
            self._final_model = save_model(self._app_dir / self.final_model_file, state, self._cfg, rounds=r + 1)
            self._history["final"] = {"round": r, "global_model": str(self._app_dir / self.final_model_file)}
        self._stream({"global/accepted_clients": len(record["accepted"]),
                      "global/rejected_clients": len(record["rejected"]),
                      **{f"wire/{n}_bytes": e["bytes"] for n, e in record["train"].items() if "bytes" in e}},
                     r, fl_ctx)
        atomic_torch_save({"round": r, "model": state, "history": json.dumps(self._history, default=str)},
                          self._app_dir / self.checkpoint_file)
        self._write_metrics()

    def _final_validation(self, fl_ctx: FLContext) -> None:
        results = fl_ctx.get_prop(VALIDATION_RESULTS_PROP) or {}
        if results and self._history["rounds"]:
            self._attach_validation(self._history["rounds"][-1], results, fl_ctx)
            final = self._history.get("final") or {}
            last = self._history["rounds"][-1]
            final.update(val_miou=last.get("val_miou"), val_pixel_acc=last.get("val_pixel_acc"),
                         validation=results)
            self._history["final"] = final
            self._write_metrics()

    def _failed(self, fl_ctx: FLContext) -> None:
        self._history["error"] = fl_ctx.get_prop(ERROR_PROP)
        self._write_metrics()

    def _end(self, fl_ctx: FLContext) -> None:
        if self._record is not None:  # a round that did not finish (a failure or an abort)
            self._record["incomplete"] = True
            self._history["rounds"].append(self._record)
            self._record = None
        if self.export_format and self._final_model is not None:
            self._export_final_model(fl_ctx)
        if self._app_dir is not None:
            self._write_metrics()

    # ------------------------------------------------------------------ helpers
    def _export_final_model(self, fl_ctx: FLContext) -> None:
        """At the end of the run, so that the sites are not kept waiting for the export."""
        self.log_info(fl_ctx, f"exporting the final model {self._final_model} as {self.export_format}")
        record = export_final_model(self._final_model, self.export_format)
        if "error" in record:
            self.log_error(fl_ctx, f"export of the final model failed ({record['error']}); "
                                   f"{self._final_model} is kept as it is")
        else:
            self.log_info(fl_ctx, f"wrote {record['module_file']} and {record['card_file']}")
        self._history["final"]["export"] = record  # set with the final model

    def _attach_validation(self, target: dict | None, results: dict, fl_ctx: FLContext) -> None:
        try:  # a hostile or broken site may send anything here: it is not the model that counts
            scores = {f"val_{k}": float(v) for k, v in image_weighted_mean(results).items()}
        except (KeyError, TypeError, ValueError) as err:
            self.log_warning(fl_ctx, f"validation results not usable ({err}): {results}")
            return
        if target is None:
            self._history["initial"] = {"validation": results, **scores}
            return
        target.update(validation=results, **scores)
        self._stream({f"global/{k}": v for k, v in scores.items()}, target["round"], fl_ctx)
        best = self._history.get("best")
        if best is None or scores["val_miou"] > best["miou"]:
            self._history["best"] = {"round": target["round"], "miou": scores["val_miou"],
                                     "pixel_acc": scores["val_pixel_acc"]}
            self.fire_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
            self.log_info(fl_ctx, f"round {target['round']}: new best global model, validation mIoU "
                                  f"{scores['val_miou']:.4f}")

    def _attach_selection(self, target: dict | None, fl_ctx: FLContext) -> None:
        if self._record is None:
            return
        weights = {name: role.get("num_samples", 0) for name, role in self._history["sites"].items()
                   if role.get("is_training_site")}
        sent = {name: entry.get("metrics") or {} for name, entry in self._record["train"].items()}
        criteria = weighted_criteria(sent, weights)
        if not criteria:
            return
        if target is None:
            self._history["initial"] = {**(self._history["initial"] or {}), "selection": criteria}
            return
        target["selection"] = criteria
        self._stream({f"global/selection_{k}": v for k, v in criteria.items()}, target["round"], fl_ctx)
        name = self.selection_criterion
        chosen = self._history.get("selected")
        if name in criteria and better(name, criteria[name], chosen["value"] if chosen else None):
            path = self._app_dir / self.selected_model_file
            atomic_torch_save({"model": to_torch_state(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)["weights"])}, path)
            self._history["selected"] = {"criterion": name, "round": target["round"], "value": criteria[name],
                                         "global_model": str(path)}
            self.log_info(fl_ctx, f"round {target['round']}: new selected global model, {name} {criteria[name]:.4f}")

    def _stream(self, values: dict, step: int, fl_ctx: FLContext) -> None:
        for tag, value in values.items():
            dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=step)
            send_analytic_dxo(self, dxo, fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def _write_metrics(self) -> None:
        text = json.dumps(self._history, indent=2, default=str)
        atomic_write_bytes(self._app_dir / self.metrics_file, text.encode())


def export_final_model(model_file: Path, fmt: str) -> dict:
    """Export ``model_file`` as ``fmt`` into its own folder (``fuss_components.export.export_model``); returns
    what ``metrics.json`` records: the written files, or the error. Never raises: whatever goes wrong in the
    export (missing backbone weights, a missing ONNX package, memory), the trained model stays as it is."""
    try:
        card = export_model(model_file, model_file.parent, fmt=fmt)
    except Exception as err:  # noqa: BLE001 - reported to the caller, who logs it and keeps the model
        return {"format": fmt, "error": f"{type(err).__name__}: {err}"}
    return {"format": fmt, "module_file": str(model_file.parent / card["module_file"]),
            "card_file": str(model_file.parent / CARD_FILE)}
