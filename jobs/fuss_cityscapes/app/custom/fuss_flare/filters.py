"""Site-side result filters.

``FussResultFilter``: only the head parameters, the centroids and the declared metadata leave a site. Configured as
a ``task_result_filter`` of every client app (tasks ``train``, ``validate``, ``site_info``), so it runs after the
Client API script returned and before anything is sent to the server. Unlike FLARE's ``DXOFilter`` base class,
which lets non-DXO results pass untouched, this filter fails closed: a result it cannot read as a DXO is replaced
by an empty error reply.

``CentroidPrivacyFilter``: optional, on ``train`` results: clips every centroid row to norm ``clip`` and adds
Gaussian noise of std ``noise_multiplier * clip`` per coordinate (``fuss_components.privacy``, where the
sensitivity argument and the (epsilon, delta) accounting are documented). It acts on ``dxo.data["centroids"]``.

Both can be configured by a job (``fuss job export --centroid-noise SIGMA --centroid-clip C``) or by a site in the
scopes of its ``local/privacy.json`` (site filters run before the job's, whatever the job says; see
``docs/deployment.md``). Both write a line to the per-job ``audit.log`` each time they process a result
(``applied filter: <name>@<job|site> on task_result ...``), which is what the POC tests read.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, MetaKey as DXOMetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter, FilterContextKey
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.utils.fl_context_utils import add_job_audit_event
from nvflare.app_common.abstract.fl_model import MetaKey

from fuss_flare import CENTROIDS_KEY, DECLARED_META, SITE_INFO_METRICS, VALIDATION_METRICS, is_model_key

# FLModel puts the metrics of a train result into the DXO meta under this key (FLModelUtils.to_shareable).
METRICS_META_KEY = MetaKey.INITIAL_METRICS
# FLARE's own record of the DXO filters already applied (a list of filter class names); kept as declared metadata.
FILTER_HISTORY_KEY = DXOMetaKey.FILTER_HISTORY


class FussResultFilter(Filter):
    def __init__(self, allowed_meta: list[str] | None = None, allowed_metrics: list[str] | None = None):
        """Strip everything but the declared content from a site's task result.

        Args:
            allowed_meta: meta keys allowed besides the training metrics (default: ``num_samples``, ``site``).
            allowed_metrics: metric names allowed in METRICS results (default: validation + site-info metrics).
                Training results may carry any float loss terms in their metrics slot.
        """
        super().__init__()
        self.allowed_meta = list(allowed_meta) if allowed_meta is not None else list(DECLARED_META)
        self.allowed_metrics = (
            list(allowed_metrics) if allowed_metrics is not None else list(VALIDATION_METRICS + SITE_INFO_METRICS)
        )

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            return _strip_payload(shareable)  # an error reply carries no payload
        try:
            dxo = from_shareable(shareable)
        except Exception as err:  # fail closed
            self.log_error(fl_ctx, f"FussResultFilter: result is not a DXO ({err}); nothing is sent")
            return _strip_payload(shareable, ReturnCode.EXECUTION_RESULT_ERROR)
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            allowed = is_model_key
        elif dxo.data_kind == DataKind.METRICS:
            allowed = self.allowed_metrics.__contains__
        else:
            self.log_error(fl_ctx, f"FussResultFilter: a DXO of kind {dxo.data_kind} may not leave the site")
            return _strip_payload(shareable, ReturnCode.EXECUTION_RESULT_ERROR)
        data, meta, dropped = {}, {}, []
        for key, value in (dxo.data or {}).items():
            if allowed(key):
                data[key] = value
            else:
                dropped.append(f"data[{key!r}]")
        for key, value in (dxo.meta or {}).items():
            if key in self.allowed_meta:
                meta[key] = value
            elif key == METRICS_META_KEY and isinstance(value, dict):
                meta[key] = {k: float(v) for k, v in value.items() if isinstance(v, (int, float))}
            elif key == FILTER_HISTORY_KEY and isinstance(value, list):
                meta[key] = [str(v) for v in value]
            else:
                dropped.append(f"meta[{key!r}]")
        if dropped:
            self.log_info(fl_ctx, f"FussResultFilter: not sent: {', '.join(sorted(dropped))}")
        kind = getattr(dxo.data_kind, "value", dxo.data_kind)
        _audit(self, fl_ctx, f"{kind} {len(data)} item(s) sent"
               + (f", {len(dropped)} dropped: {', '.join(sorted(dropped))}" if dropped else ", nothing dropped"))
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta).update_shareable(_strip_payload(shareable))


class CentroidPrivacyFilter(DXOFilter):
    def __init__(self, clip: float = 1.0, noise_multiplier: float = 0.0, delta: float = 1e-5,
                 rounds: int | None = None, centroids_key: str = CENTROIDS_KEY):
        """Clip each centroid row to L2 norm ``clip`` and add N(0, (noise_multiplier * clip)^2) per coordinate.

        Args:
            clip: C, the largest row norm that leaves the site (> 0).
            noise_multiplier: sigma, noise std per coordinate in units of C (0: clipping only, no DP guarantee).
            delta: delta of the per-round (epsilon, delta) accounting.
            rounds: planned number of rounds of the job, for the total in the audit line (None: not reported).
            centroids_key: the parameter to protect.

        Noise comes from fresh OS entropy in every call (never from the job's seed). Each release is written to
        the job's audit.log with its clip count and the per-round and cumulative (epsilon, delta) of this job
        (simple composition over the releases this filter made; ``fuss_components.privacy.account``).
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        if not clip > 0:
            raise ValueError(f"CentroidPrivacyFilter: clip must be > 0, got {clip}")
        if noise_multiplier < 0:
            raise ValueError(f"CentroidPrivacyFilter: noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"CentroidPrivacyFilter: delta must be in (0, 1), got {delta}")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.rounds = rounds
        self.centroids_key = centroids_key
        self.releases = 0  # centroid matrices released by this site in this job so far

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        import numpy as np
        import torch

        from fuss_components.privacy import account, privatize_centroids

        value = (dxo.data or {}).get(self.centroids_key)
        if value is None:
            return None
        as_numpy = isinstance(value, np.ndarray)
        centroids = torch.from_numpy(np.ascontiguousarray(value)) if as_numpy else value.detach().cpu()
        released, num_clipped = privatize_centroids(centroids.float(), self.clip, self.noise_multiplier)
        released = released.to(centroids.dtype)
        dxo.data[self.centroids_key] = released.numpy() if as_numpy else released
        self.releases += 1
        k = int(centroids.shape[0])
        msg = (f"clip C={self.clip:g}, sigma={self.noise_multiplier:g}: {num_clipped}/{k} rows clipped, "
               f"noise std {self.noise_multiplier * self.clip:g} per coordinate; ")
        if self.noise_multiplier > 0:
            so_far = account(k, self.clip, self.noise_multiplier, self.delta, self.releases)
            msg += (f"release {self.releases}: per round (epsilon={so_far.epsilon:.4g}, delta={self.delta:g}), "
                    f"cumulative (epsilon={so_far.total_epsilon:.4g}, delta={so_far.total_delta:g}) by simple "
                    f"composition")
            if self.rounds:
                planned = account(k, self.clip, self.noise_multiplier, self.delta, int(self.rounds))
                msg += (f"; all {self.rounds} rounds: (epsilon={planned.total_epsilon:.4g}, "
                        f"delta={planned.total_delta:g})")
        else:
            msg += f"release {self.releases}: no noise, no DP guarantee (epsilon=inf)"
        self.log_info(fl_ctx, f"CentroidPrivacyFilter: {msg}")
        add_job_audit_event(fl_ctx=fl_ctx, msg=f"CentroidPrivacyFilter: {msg}")
        return dxo


def _audit(flt: Filter, fl_ctx: FLContext, detail: str) -> None:
    """The audit line FLARE's DXOFilter writes (``applied filter: NAME@SOURCE on CHAIN``), plus a detail."""
    source = flt.get_prop(FilterContextKey.SOURCE, "?")
    chain = flt.get_prop(FilterContextKey.CHAIN_TYPE, "?")
    add_job_audit_event(fl_ctx=fl_ctx, msg=f"applied filter: {type(flt).__name__}@{source} on {chain}: {detail}")


def _strip_payload(shareable: Shareable, rc: str | None = None) -> Shareable:
    """Drop every top-level entry but FLARE's headers (task id, cookies, return code)."""
    for key in [k for k in shareable.keys() if k != ReservedHeaderKey.HEADERS]:
        del shareable[key]
    if rc is not None:
        shareable.set_return_code(rc)
    return shareable
