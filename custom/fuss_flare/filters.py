"""What leaves a site, on FLARE objects: the result filter, the centroid privacy filter and the analytics forwarder.

Each reads FLARE's objects, calls ``fuss_components.wire`` (the schema of what may leave a site), writes back what
passes and an audit line. Both filters can be configured by a job or by a site in the scopes of its
``local/privacy.json`` (site filters run before the job's, whatever the job says).
"""

from __future__ import annotations

from collections import Counter

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName, TrackConst
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter, FilterContextKey
from nvflare.apis.fl_constant import EventScope, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo
from nvflare.apis.utils.fl_context_utils import add_job_audit_event
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.widgets.convert_to_fed_event import FED_EVENT_PREFIX
from nvflare.widgets.widget import Widget

from fuss_components import privacy, wire
from fuss_components.head import CENTROIDS_KEY
from fuss_flare import CONFIG_FILE, TASK_SITE_INFO, TASK_TRAIN, TASK_VALIDATE, load_site_config, load_site_policy

RESULT_KINDS = {TASK_TRAIN: DataKind.WEIGHTS, TASK_VALIDATE: DataKind.METRICS, TASK_SITE_INFO: DataKind.METRICS}

_DXO_KEY = "DXO"  # where DXO.update_shareable puts the DXO in a Shareable
# FLARE's names for the headers a result needs; wire holds their policy. "DXO" is what from_shareable requires.
_HEADER_RULES = wire.HeaderRules(
    return_code=ReservedHeaderKey.RC, content_type=ReservedHeaderKey.CONTENT_TYPE, content_type_value="DXO",
    return_codes=frozenset(v for k, v in vars(ReturnCode).items() if not k.startswith("_") and isinstance(v, str)),
    name_keys=(ReservedHeaderKey.TASK_NAME, ReservedHeaderKey.TASK_ID),
    round_keys=(AppConstants.CURRENT_ROUND, AppConstants.NUM_ROUNDS, AppConstants.START_ROUND))


class _Refused(Exception):
    """Nothing of this result may be sent; the message says why."""

    def __init__(self, reason: str, dropped: list[tuple[str, str]] = ()):
        super().__init__(reason)
        self.dropped = list(dropped)


class FussResultFilter(Filter):
    def __init__(self, max_num_samples: int | None = None, max_head_parameters: int = wire.DEFAULT_MAX_HEAD_PARAMETERS,
                 max_centroid_norm: float = wire.DEFAULT_MAX_CENTROID_NORM, config_file: str = CONFIG_FILE):
        """Send only what ``wire.check_headers`` and ``wire.check_result`` let pass, naming the rest with its reason in
        the audit line (``applied filter: FussResultFilter@<site|job> on task_result: ...``). A result that is not a
        DXO of the task's kind, a task that is not a FUSS task, or a job whose configuration cannot be read becomes
        an empty error reply (fail closed).

        Args:
            max_num_samples, max_head_parameters, max_centroid_norm: this site's bounds (``wire.SiteLimits``).
            config_file: the job's FussConfig in the app's ``config/`` folder.
        """
        super().__init__()
        try:
            self.limits = wire.SiteLimits(max_num_samples, max_head_parameters, max_centroid_norm)
        except ValueError as err:
            raise ValueError(f"FussResultFilter: {err}") from None
        self.config_file = config_file
        self._schemas: dict[tuple, wire.JobSchema] = {}

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        try:
            return self._filter(shareable, fl_ctx, task)
        except _Refused as refusal:
            reason, dropped = str(refusal), refusal.dropped
        except Exception as err:  # content this filter cannot even read
            self.log_exception(fl_ctx, f"FussResultFilter: cannot check the {task} result: {err}")
            reason, dropped = f"the result could not be checked ({type(err).__name__})", []
        # fail closed: the result becomes an empty error reply
        _strip_payload(shareable)[ReservedHeaderKey.HEADERS] = {}
        shareable.set_return_code(ReturnCode.EXECUTION_RESULT_ERROR)
        self.log_error(fl_ctx, f"FussResultFilter: nothing of the {wire.describe(task)} result is sent: {reason}",
                       fire_event=False)
        self._audit(fl_ctx, f"{wire.describe(task)} result refused, nothing sent: {reason}", dropped)
        return shareable

    def _filter(self, shareable: Shareable, fl_ctx: FLContext, task) -> Shareable:
        shareable[ReservedHeaderKey.HEADERS], dropped = wire.check_headers(
            shareable.get(ReservedHeaderKey.HEADERS), _HEADER_RULES)
        payload = [key for key in shareable if key != ReservedHeaderKey.HEADERS]
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            dropped += [(f"payload[{wire.describe(k)}]", "an error reply carries no payload") for k in payload]
            _strip_payload(shareable)
            self._audit(fl_ctx, f"{wire.describe(task)} error reply {rc}: nothing sent", dropped)
            return shareable
        kind = RESULT_KINDS.get(task) if isinstance(task, str) else None
        if kind is None:
            raise _Refused(f"task {wire.describe(task)} is not a FUSS task", dropped)
        try:
            dxo = from_shareable(shareable)
        except Exception:
            raise _Refused(f"the {task} result is not a DXO", dropped) from None
        dropped += [(f"payload[{wire.describe(k)}]", "outside the DXO") for k in payload if k != _DXO_KEY]
        if dxo.data_kind != kind:
            raise _Refused(f"a {task} result must be a {kind.value} DXO, not {_kind_name(dxo.data_kind)}", dropped)
        schema = self._schema(fl_ctx)
        data, meta, more = wire.check_result(task, dxo.data, dxo.meta, schema)
        _strip_payload(shareable)
        DXO(data_kind=kind, data=data, meta=meta).update_shareable(shareable)
        self._audit(fl_ctx, f"{task} {kind.value} {wire.describe_sent(data, meta, schema)}", dropped + more)
        return shareable

    def _schema(self, fl_ctx: FLContext) -> wire.JobSchema:
        """The schema of this job on this site, derived once per job."""
        identity = fl_ctx.get_identity_name()
        key = (fl_ctx.get_job_id(), fl_ctx.get_prop(FLContextKey.APP_ROOT), identity)
        if key not in self._schemas:
            try:
                cfg = load_site_config(fl_ctx, self.config_file)
            except Exception as err:
                raise _Refused(f"the job's FUSS configuration cannot be read ({type(err).__name__}: {err})") from None
            schema = wire.job_schema(cfg, identity, self.limits, load_site_policy(fl_ctx))
            if schema.bounds_problem:
                self.log_warning(fl_ctx, f"FussResultFilter: this site's image counts are unknown "
                                         f"({schema.bounds_problem}); counts leave only under "
                                         f"max_num_samples={self.limits.max_num_samples}", fire_event=False)
            self._schemas[key] = schema
        return self._schemas[key]

    def _audit(self, fl_ctx: FLContext, detail: str, dropped: list[tuple[str, str]]) -> None:
        """Log, and write the audit line FLARE's DXOFilter writes (``applied filter: NAME@SOURCE on CHAIN``)."""
        detail += f"; {wire.describe_dropped(dropped)}"
        if dropped:
            self.log_warning(fl_ctx, f"FussResultFilter: {detail}", fire_event=False)
        else:
            self.log_info(fl_ctx, f"FussResultFilter: {detail}")
        source, chain = self.get_prop(FilterContextKey.SOURCE, "?"), self.get_prop(FilterContextKey.CHAIN_TYPE, "?")
        add_job_audit_event(fl_ctx=fl_ctx, msg=f"applied filter: {type(self).__name__}@{source} on {chain}: {detail}")


class CentroidPrivacyFilter(DXOFilter):
    def __init__(self, clip: float = 1.0, noise_multiplier: float = 0.0, delta: float = privacy.DEFAULT_DELTA,
                 rounds: int | None = None, centroids_key: str = CENTROIDS_KEY):
        """On ``train`` results: clip each centroid row to L2 norm ``clip`` and add N(0, (noise_multiplier * clip)^2)
        per coordinate, from fresh OS entropy in every call, never from the job's seed (``fuss_components.privacy``:
        the sensitivity argument and the (epsilon, delta) accounting). Each release is written to the job's audit
        log (``privacy.describe_release``: clip count, per-round and cumulative (epsilon, delta)).

        Args:
            clip: C, the largest row norm that leaves the site (> 0).
            noise_multiplier: sigma, noise std per coordinate in units of C (0: clipping only, no DP guarantee).
            delta: delta of the per-round (epsilon, delta) accounting.
            rounds: planned number of rounds of the job, for the total in the audit line (None: not reported).
            centroids_key: the parameter to protect.
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        try:
            privacy.check_noise_settings(clip, noise_multiplier, delta)
        except ValueError as err:
            raise ValueError(f"CentroidPrivacyFilter: {err}") from None
        self.clip, self.noise_multiplier, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.rounds = rounds
        self.centroids_key = centroids_key
        self.releases = 0  # centroid matrices released by this site in this job so far

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        value = (dxo.data or {}).get(self.centroids_key)
        if value is None:
            return None
        dxo.data[self.centroids_key], num_clipped = privacy.release_centroids(value, self.clip, self.noise_multiplier)
        self.releases += 1
        msg = "CentroidPrivacyFilter: " + privacy.describe_release(
            int(value.shape[0]), num_clipped, self.clip, self.noise_multiplier, self.delta, self.releases, self.rounds)
        self.log_info(fl_ctx, msg)
        add_job_audit_event(fl_ctx=fl_ctx, msg=msg)
        return dxo


class FussAnalyticsForwarder(Widget):
    def __init__(self, events_to_convert: list[str] | None = None, fed_event_prefix: str = FED_EVENT_PREFIX,
                 max_global_step: int = 100_000):
        """Forward this site's analytics scalars to the server, and nothing else (in place of FLARE's
        ``ConvertToFedEvent``): a scalar (FLARE's SCALAR or METRIC analytics type) that passes
        ``wire.check_analytics`` leaves as a new event of tag, value and step only; text, images and unknown tags
        stay on the site, named in the audit log.

        Args:
            events_to_convert: the local analytics events to forward (default: FLARE's ``analytix_log_stats``).
            fed_event_prefix: prefix of the federated event (FLARE's receivers listen to ``fed.<event>``).
            max_global_step: the largest step an analytics value may carry (FUSS logs round numbers).
        """
        super().__init__()
        self.events_to_convert = list(events_to_convert or [ANALYTIC_EVENT_TYPE])
        self.fed_event_prefix = fed_event_prefix
        self.max_global_step = int(max_global_step)
        self.forwarded: Counter[str] = Counter()
        self.dropped = 0

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.END_RUN:
            summary = wire.describe_forwarded(self.forwarded, self.dropped)
            add_job_audit_event(fl_ctx=fl_ctx, msg=f"FussAnalyticsForwarder: {summary}")
            return
        if event_type not in self.events_to_convert:
            return
        if fl_ctx.get_prop(FLContextKey.EVENT_SCOPE, EventScope.LOCAL) == EventScope.FEDERATION:
            return  # already a federated event (and not this widget's to forward)
        tag, value, step, reason = self._check(fl_ctx.get_prop(FLContextKey.EVENT_DATA))
        if reason is not None:
            self.dropped += 1
            msg = f"FussAnalyticsForwarder: not forwarded: analytics {wire.describe(tag)} ({reason})"
            self.log_warning(fl_ctx, msg, fire_event=False)
            add_job_audit_event(fl_ctx=fl_ctx, msg=msg)
            return
        dxo = create_analytic_dxo(tag, value, AnalyticsDataType.SCALAR, writer=LogWriterName.TORCH_TB,
                                  **({TrackConst.GLOBAL_STEP_KEY: step} if step is not None else {}))
        self.forwarded[tag] += 1
        self.fire_fed_event(self.fed_event_prefix + event_type, dxo.to_shareable(), fl_ctx)

    def _check(self, data) -> tuple:
        """(tag, value, step, None) of a forwardable scalar, else (tag or None, None, None, reason)."""
        if not isinstance(data, Shareable):
            return None, None, None, f"event data is a {type(data).__name__}, not a Shareable"
        try:
            dxo = from_shareable(data)
        except Exception:
            return None, None, None, "event data is not a DXO"
        if dxo.data_kind != DataKind.ANALYTIC:
            return None, None, None, f"a {_kind_name(dxo.data_kind)} DXO, not analytics"
        tag = dxo.data.get(TrackConst.TRACK_KEY)
        data_type = dxo.get_meta_prop(TrackConst.DATA_TYPE_KEY)
        if data_type not in (AnalyticsDataType.SCALAR, AnalyticsDataType.METRIC):
            name = getattr(data_type, "value", None) or wire.describe(data_type)
            return tag, None, None, f"{name} analytics are not forwarded, only scalars"
        value, step, reason = wire.check_analytics(tag, dxo.data.get(TrackConst.TRACK_VALUE),
                                                   dxo.data.get(TrackConst.GLOBAL_STEP_KEY), self.max_global_step)
        return tag, value, step, reason


def _kind_name(kind) -> str:
    return wire.describe(getattr(kind, "value", kind))


def _strip_payload(shareable: Shareable) -> Shareable:
    """Drop every top-level entry but FLARE's headers."""
    for key in [k for k in shareable.keys() if k != ReservedHeaderKey.HEADERS]:
        del shareable[key]
    return shareable
