"""Site-side result filter: only the head parameters, the centroids and the declared metadata leave a site.

Configured as a ``task_result_filter`` of every client app (tasks ``train``, ``validate``, ``site_info``), so it
runs after the Client API script returned and before anything is sent to the server. Unlike FLARE's
``DXOFilter`` base class, which lets non-DXO results pass untouched, this filter fails closed: a result it cannot
read as a DXO is replaced by an empty error reply.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.abstract.fl_model import MetaKey

from fuss_flare import DECLARED_META, SITE_INFO_METRICS, VALIDATION_METRICS, is_model_key

# FLModel puts the metrics of a train result into the DXO meta under this key (FLModelUtils.to_shareable).
METRICS_META_KEY = MetaKey.INITIAL_METRICS


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
            else:
                dropped.append(f"meta[{key!r}]")
        if dropped:
            self.log_info(fl_ctx, f"FussResultFilter: not sent: {', '.join(sorted(dropped))}")
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta).update_shareable(_strip_payload(shareable))


def _strip_payload(shareable: Shareable, rc: str | None = None) -> Shareable:
    """Drop every top-level entry but FLARE's headers (task id, cookies, return code)."""
    for key in [k for k in shareable.keys() if k != ReservedHeaderKey.HEADERS]:
        del shareable[key]
    if rc is not None:
        shareable.set_return_code(rc)
    return shareable
