"""Server-side aggregator: FLARE results -> ``fuss_components.aggregation`` (screen, then aggregate).

One class serves FedAvg, FedCC-kmeans and FedCC-maximin (``federation.aggregator`` of the job's config). Every
result is keyed by the client of the FLARE session that delivered it (``SESSION_CLIENT_HEADER``, stamped by
``FussController``; a result without it is rejected), never by what the client claims: a peer identity or a
declared ``site`` in its meta that differs is rejected. A result with ``num_samples == 0`` and no
parameters is a validation-only site's zero-weight result: recorded, not averaged. After screening the
aggregator fires ``SCREENING_DONE`` with the accepted and rejected sites and their centroid drift
(``fuss_components.aggregation.centroid_drift``) in the FLContext (``SCREENING_REPORT``), for the recorder; no
aggregation math lives here.
"""

from __future__ import annotations

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from fuss_components.aggregation import AggregationError, ClientUpdate, aggregate, centroid_drift
from fuss_components.screening import screen_updates
from fuss_components.head import join_state, split_state
from fuss_flare import (
    CONFIG_FILE,
    DECLARED_COUNTS_PROP,
    ERROR_PROP,
    JOB_FAILED,
    META_NUM_SAMPLES,
    META_SITE,
    SCREENING_DONE,
    SCREENING_REPORT,
    SESSION_CLIENT_HEADER,
    load_job_config,
    to_torch_state,
    weights_shareable,
)


class FussAggregator(Aggregator):
    def __init__(self, config_file: str = CONFIG_FILE):
        """Aggregate the sites' heads and centroids with the rule of ``federation.aggregator``; fewer accepted
        updates than ``federation.min_clients`` (default: every training site) fails the round."""
        super().__init__()
        self.config_file = config_file
        self._cfg = None
        self._updates: dict[str, ClientUpdate] = {}
        self._rejected: list[tuple[str, str]] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._cfg = load_job_config(fl_ctx, self.config_file)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        claimed = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "") or "?"
        session = shareable.get_header(SESSION_CLIENT_HEADER)
        client = session or claimed
        try:
            if not session:
                raise ValueError("carries no session client (FussAggregator needs FussController, which stamps it)")
            if claimed != session:  # a hostile peer, or FLARE's simulator start-up race (docs/reliability.md)
                raise ValueError(f"arrived in the FLARE session of {session!r} but carries the identity {claimed!r}")
            dxo = from_shareable(shareable)
            meta = dxo.meta or {}
            declared = meta.get(META_SITE, client)
            if declared != client:
                raise ValueError(f"declares site {declared!r} but FLARE authenticated it as {client!r}")
            if client in self._updates:
                raise ValueError("sent a second result in this round")
            state = to_torch_state(dxo.data)
            if not state and meta.get(META_NUM_SAMPLES) == 0:
                return True  # a validation-only site's zero-weight result: its metrics are recorded elsewhere
            head, centroids = split_state(state)
        except Exception as err:
            self._rejected.append((client, str(err)))
            return False
        metrics = dict(meta.get(MetaKey.INITIAL_METRICS) or {})
        self._updates[client] = ClientUpdate(client, head, centroids, meta.get(META_NUM_SAMPLES), metrics)
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        round_idx = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        ref_head, ref_centroids = split_state(to_torch_state(global_model["weights"]))
        num_clusters, dim = (int(n) for n in ref_centroids.shape)
        declared = fl_ctx.get_prop(DECLARED_COUNTS_PROP)  # None: no census (an aggregator used alone)
        # each site's local steps, from the job's configuration and the count it declared (never from the site)
        steps = {site: self._cfg.round_steps(int(n)) for site, n in (declared or {}).items()}
        accepted, rejected = screen_updates(list(self._updates.values()), ref_head, num_clusters, dim,
                                            federation=self._cfg.federation, declared_counts=declared,
                                            round_steps=steps)
        rejected = self._rejected + list(rejected)
        report = {"accepted": sorted(u.site for u in accepted), "rejected": [[s, r] for s, r in rejected]}
        if accepted:  # how far the accepted sites' centroids drifted apart (recorded per round)
            report["drift"] = centroid_drift(accepted, self._cfg.federation, num_clusters)
        for site, reason in rejected:
            self.log_warning(fl_ctx, f"round {round_idx}: rejected the update of {site}: {reason}")
        fl_ctx.set_prop(SCREENING_REPORT, report, private=True, sticky=False)
        self.fire_event(SCREENING_DONE, fl_ctx)
        self.reset(fl_ctx)
        need = self._cfg.federation.min_clients or len(declared or {}) or 1
        if len(accepted) < need:
            reason = (f"round {round_idx}: {len(accepted)} acceptable update(s) {report['accepted']}, fewer than "
                      f"min_clients={need}; rejected: {report['rejected']}")
            fl_ctx.set_prop(ERROR_PROP, reason, private=True, sticky=False)
            self.fire_event(JOB_FAILED, fl_ctx)
            raise AggregationError(reason)
        head, centroids = aggregate(accepted, self._cfg.federation, num_clusters, reference_head=ref_head)
        self.log_info(fl_ctx, f"round {round_idx}: {self._cfg.federation.aggregator} over {report['accepted']}")
        return weights_shareable(join_state(head, centroids))

    def reset(self, fl_ctx: FLContext):
        self._updates = {}
        self._rejected = []
