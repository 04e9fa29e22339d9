"""Server-side aggregator: FLARE results -> ``fuss_components.aggregation`` (screen, then aggregate).

One class serves FedAvg (switch W from ``federation.weighted``), FedCC-kmeans and FedCC-maximin: the rule is
``federation.aggregator`` of the job's config, the robust mode ``federation.robust``. Two results claiming the
same site name are both rejected (the genuine one cannot be told apart, and keeping the first to arrive would
make the global model depend on arrival order). The switches E and C and FedProx / MOON act on the sites
(``fuss_components.site.Site.train``), so they work with every rule. No aggregation math lives here.
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fuss_components.aggregation import AggregationError, ClientUpdate, aggregate, screen_updates
from fuss_components.head import join_state, split_state
from fuss_flare import CONFIG_FILE, META_NUM_SAMPLES, META_SITE, TRAINING_SITES_PROP, load_job_config, to_torch_state


class FussAggregator(ModelAggregator):
    def __init__(self, config_file: str = CONFIG_FILE, min_clients: int | None = None):
        """Aggregate the sites' heads and centroids with the rule of ``federation.aggregator``.

        Args:
            config_file: the job's FussConfig JSON (in the server app's custom folder).
            min_clients: fewest accepted updates a round needs; fewer raises ``AggregationError`` (the job fails).
                None: ``federation.min_clients`` of the config, else every training site the controller found.
        """
        super().__init__()
        self.config_file = config_file
        self.min_clients = min_clients
        self._cfg = None
        self._updates: list[ClientUpdate] = []
        self._unreadable: list[tuple[str, str]] = []
        self._peer = ""
        self.last_report: dict = {}  # read by FussController after each round

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self._cfg = load_job_config(fl_ctx, self.config_file)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        self.fl_ctx = fl_ctx
        self._peer = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "") or "?"
        try:
            model = FLModelUtils.from_shareable(shareable, fl_ctx)
        except Exception as err:
            self._unreadable.append((self._peer, f"client {self._peer!r}: unreadable result ({err})"))
            return False
        return self.accept_model(model)

    def accept_model(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get(META_SITE) or self._peer)
        try:
            head, centroids = split_state(to_torch_state(model.params))
        except (KeyError, TypeError) as err:
            self._unreadable.append((site, f"site {site!r} (client {self._peer!r}): malformed parameters ({err})"))
            return False
        metrics = dict(meta.get(MetaKey.INITIAL_METRICS) or {})
        self._updates.append(ClientUpdate(site, head, centroids, meta.get(META_NUM_SAMPLES), metrics))
        return True

    def aggregate_model(self) -> FLModel:
        round_idx = self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        global_model = self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        ref_head, ref_centroids = split_state(to_torch_state(global_model["weights"]))
        num_clusters, dim = (int(n) for n in ref_centroids.shape)
        accepted, rejected = screen_updates(self._updates, ref_head, num_clusters, dim,
                                            federation=self._cfg.federation, reject_all_duplicates=True)
        rejected = self._unreadable + rejected
        for site, reason in rejected:
            self.warning(f"round {round_idx}: rejected the update of {site}: {reason}")
        self.last_report = {
            "accepted": sorted(u.site for u in accepted),
            "rejected": [[site, reason] for site, reason in rejected],
        }
        updates = accepted
        self.reset_stats()
        training_sites = self.fl_ctx.get_prop(TRAINING_SITES_PROP) or []
        need = self.min_clients or self._cfg.federation.min_clients or len(training_sites) or 1
        if len(updates) < need:
            raise AggregationError(
                f"round {round_idx}: {len(updates)} acceptable client update(s) {self.last_report['accepted']}, "
                f"fewer than min_clients={need}; rejected: {self.last_report['rejected']}"
            )
        head, centroids = aggregate(updates, self._cfg.federation, num_clusters)
        self.info(
            f"round {round_idx}: {self._cfg.federation.aggregator} over {self.last_report['accepted']}"
            + (f" ({len(rejected)} rejected)" if rejected else "")
        )
        return FLModel(params=join_state(head, centroids), params_type=ParamsType.FULL)

    def reset_stats(self):
        self._updates = []
        self._unreadable = []
