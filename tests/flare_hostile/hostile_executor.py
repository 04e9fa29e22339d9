"""Test-only: a FUSS site whose code a hostile job or a hostile peer replaced. Shipped by tests as BYOC code in a
job's ``custom/`` folder (the FLARE simulator allows it); never installed, never part of ``fuss_flare``.

``faults`` maps a FLARE client name to what it does to its ``train`` result after honest training:
``flip`` (sign-flipped head), ``scale`` (head x 100), ``nan`` (NaN centroids), ``extra_centroid``, ``inflate``
(claims 1,000 images, more than it declared), ``spoof:<name>`` (declares another site's name), ``impersonate:<name>``
(also rewrites the identity in the FLARE context its result carries), ``leak`` (adds an undeclared parameter, meta
entry and metric).
"""

from __future__ import annotations

import math

import torch
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey

from fuss_flare import META_NUM_SAMPLES, META_SITE, TASK_TRAIN
from fuss_flare.executor import FussExecutor


class HostileExecutor(FussExecutor):
    def __init__(self, faults: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = dict(faults or {})

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        result = super().execute(task_name, shareable, fl_ctx, abort_signal)
        faults = self.faults.get(fl_ctx.get_identity_name(), [])
        if task_name != TASK_TRAIN or not faults:
            return result
        dxo = from_shareable(result)
        state, meta = dict(dxo.data), dict(dxo.meta)
        for fault in faults:
            print(f"HOSTILE TEST EXECUTOR: {fl_ctx.get_identity_name()} applies {fault}")
            if fault == "flip":
                state = {k: (-v if k.startswith("head.") else v) for k, v in state.items()}
            elif fault == "scale":
                state = {k: (100 * v if k.startswith("head.") else v) for k, v in state.items()}
            elif fault == "nan":
                state["centroids"] = torch.full_like(state["centroids"], math.nan)
            elif fault == "extra_centroid":
                state["centroids"] = torch.cat([state["centroids"], state["centroids"][:1]])
            elif fault == "inflate":
                meta[META_NUM_SAMPLES] = 1000
            elif fault.startswith("spoof:"):
                meta[META_SITE] = fault.split(":", 1)[1]
            elif fault.startswith("impersonate:"):
                name = meta[META_SITE] = fault.split(":", 1)[1]
                # FLARE copies the public props of this context into the result's peer context
                if not any(fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=sticky)
                           for sticky in (True, False)):
                    raise RuntimeError("could not rewrite the identity")
            elif fault == "leak":
                state["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
                meta["image_ids"] = ["secret_000"]
                meta[MetaKey.INITIAL_METRICS] = {**meta.get(MetaKey.INITIAL_METRICS, {}), "path": "/data/secret.jpg"}
            else:
                raise ValueError(f"unknown fault {fault!r}")
        dxo.data, dxo.meta = state, meta
        return dxo.update_shareable(result)
