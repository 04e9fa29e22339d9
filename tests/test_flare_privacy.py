"""The centroid privacy filter and its configuration on FLARE objects: what ``CentroidPrivacyFilter`` changes and
what it writes to the audit log, the job options that configure the filters, and the site policy example
``poc/privacy.json`` as FLARE itself parses it. The math it calls: ``tests/test_privacy.py``; ``FussResultFilter``:
``tests/test_flare_filters.py``; the filters inside a running federation: ``tests/test_poc.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import FilterChainType, FilterContextKey, FilterSource
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.sec.audit import AuditService

from fuss_components import privacy as P
from fuss_components.config import FussConfig
from fuss_flare import CONFIG_FILE
from fuss_flare.filters import CentroidPrivacyFilter, FussResultFilter
from fuss_flare.job import main as job_main

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- filters


def _train_result(centroids: torch.Tensor) -> tuple:
    head = {"head.linear.weight": torch.randn(4, 6), "head.linear.bias": torch.randn(4)}
    shareable = FLModelUtils.to_shareable(FLModel(params={**head, "centroids": centroids},
                                                  metrics={"loss_self": 0.5}, meta={"num_samples": 5, "site": "s1"}))
    return head, shareable


def _as_job_filter(flt):
    flt.set_prop(FilterContextKey.SOURCE, FilterSource.JOB)
    flt.set_prop(FilterContextKey.CHAIN_TYPE, FilterChainType.TASK_RESULT_CHAIN)
    return flt


@pytest.fixture
def audit_log(tmp_path):
    AuditService.close()
    path = tmp_path / "audit.log"
    AuditService.initialize(str(path))
    yield path
    AuditService.close()


def test_centroid_privacy_filter_changes_only_the_centroids_and_audits(audit_log):
    centroids = torch.nn.functional.normalize(torch.randn(3, 4), dim=1) * 2  # every row has norm 2 > C
    head, shareable = _train_result(centroids.clone())
    flt = _as_job_filter(CentroidPrivacyFilter(clip=0.5, noise_multiplier=0.0, rounds=4))
    dxo = from_shareable(flt.process(shareable, FLContext()))
    assert torch.allclose(dxo.data["centroids"].norm(dim=1), torch.full((3,), 0.5))
    assert torch.allclose(dxo.data["centroids"], centroids / 4)
    assert all(torch.equal(dxo.data[k], v) for k, v in head.items())
    assert dxo.meta["num_samples"] == 5 and dxo.meta["filter_history"] == ["CentroidPrivacyFilter"]

    head, shareable = _train_result(centroids.clone())
    noisy = _as_job_filter(CentroidPrivacyFilter(clip=0.5, noise_multiplier=1.0, rounds=4))
    out1 = from_shareable(noisy.process(shareable, FLContext())).data["centroids"]
    assert not torch.allclose(out1, centroids / 4)
    out2 = from_shareable(noisy.process(_train_result(centroids.clone())[1], FLContext())).data["centroids"]
    assert not torch.equal(out1, out2)  # fresh noise per release
    lines = audit_log.read_text().splitlines()
    assert sum("applied filter: CentroidPrivacyFilter@job on task_result" in line for line in lines) == 3
    first = P.account(3, 0.5, 1.0, 1e-5, 1)
    assert any("3/3 rows clipped" in line and "no DP guarantee" in line for line in lines)
    assert any(f"release 1: per round (epsilon={first.epsilon:.4g}" in line for line in lines)
    two = P.account(3, 0.5, 1.0, 1e-5, 2)
    assert any("release 2:" in line and f"cumulative (epsilon={two.total_epsilon:.4g}, delta=2e-05)" in line
               for line in lines)
    planned = P.account(3, 0.5, 1.0, 1e-5, 4)
    assert any(f"all 4 rounds: (epsilon={planned.total_epsilon:.4g}" in line for line in lines)


def test_centroid_privacy_filter_leaves_other_results_alone():
    metrics = DXO(DataKind.METRICS, data={"miou": 0.4}).to_shareable()
    out = CentroidPrivacyFilter(clip=1.0, noise_multiplier=1.0).process(metrics, FLContext())
    assert from_shareable(out).data == {"miou": 0.4}
    no_centroids = DXO(DataKind.WEIGHTS, data={"head.linear.bias": torch.ones(2)}).to_shareable()
    out = CentroidPrivacyFilter(clip=1.0, noise_multiplier=1.0).process(no_centroids, FLContext())
    assert torch.equal(from_shareable(out).data["head.linear.bias"], torch.ones(2))
    for bad in ({"clip": 0.0}, {"noise_multiplier": -1.0}, {"delta": 1.5}):
        with pytest.raises(ValueError):
            CentroidPrivacyFilter(**bad)


# ---------------------------------------------------------------------------------------------- job options


def test_job_export_privacy_options(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert job_main(["export", "--preset", "polyp", "--rounds", "4", "--centroid-noise", "0.3", "--centroid-clip",
                     "0.8", "--privacy-delta", "1e-6", "--privacy-scope", "fuss-dp", "--server-param",
                     "dead_client_grace_period=0", "--out", str(out)]) == 0
    job = out / "fuss_polyp"
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    (chain,) = client["task_result_filters"]
    assert [f["path"] for f in chain["filters"]] == ["fuss_flare.filters.FussResultFilter",
                                                     "fuss_flare.filters.CentroidPrivacyFilter"]
    assert chain["filters"][1]["args"] == {"clip": 0.8, "noise_multiplier": 0.3, "delta": 1e-6, "rounds": 4}
    assert json.loads((job / "meta.json").read_text())["scope"] == "fuss-dp"
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["dead_client_grace_period"] == 0
    # the FLARE configurator builds the filter from the exported arguments
    from nvflare.fuel.utils.class_utils import instantiate_class

    built = instantiate_class(chain["filters"][1]["path"], chain["filters"][1]["args"])
    assert (built.clip, built.noise_multiplier, built.delta, built.rounds) == (0.8, 0.3, 1e-6, 4)
    # no privacy option: no privacy filter, no scope (the committed jobs)
    assert job_main(["export", "--preset", "polyp", "--out", str(out), "--name", "plain"]) == 0
    client = json.loads((out / "plain" / "app" / "config" / "config_fed_client.json").read_text())
    assert [f["path"] for f in client["task_result_filters"][0]["filters"]] == ["fuss_flare.filters.FussResultFilter"]
    assert "scope" not in json.loads((out / "plain" / "meta.json").read_text())
    # clip only (no noise) is allowed; impossible values are refused before anything is written
    assert job_main(["export", "--preset", "polyp", "--centroid-clip", "1", "--out", str(out), "--name", "c"]) == 0
    capsys.readouterr()
    for bad in (["--centroid-noise", "-1"], ["--centroid-clip", "0"], ["--privacy-delta", "2"]):
        assert job_main(["export", "--preset", "polyp", *bad, "--out", str(out), "--name", "bad"]) == 2
        assert not (out / "bad").exists()
    assert "--centroid-noise" in capsys.readouterr().err
    # the job carries its config in app/config (a custom/ folder would make it BYOC)
    assert FussConfig.load(job / "app" / "config" / CONFIG_FILE).federation.rounds == 4
    assert not (job / "app" / "custom").exists()


# ---------------------------------------------------------------------------------------------- site policy


def test_privacy_json_example_is_a_valid_flare_site_policy(tmp_path):
    """FLARE's own parser (the one a site runs at start-up) builds every filter of both scopes."""
    from nvflare.app_common.filters.exclude_vars import ExcludeVars
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    class Workspace:  # the one method create_privacy_manager uses
        def get_site_privacy_file_path(self):
            return str(REPO / "poc" / "privacy.json")

    mgr = create_privacy_manager(Workspace(), names_only=False)
    assert sorted(mgr.name_to_scopes) == ["fuss", "fuss-dp"] and mgr.default_scope.name == "fuss"
    for name, expected in (("fuss", [ExcludeVars, FussResultFilter]),
                           ("fuss-dp", [ExcludeVars, FussResultFilter, CentroidPrivacyFilter])):
        chain = mgr.name_to_scopes[name].task_result_filters["out"]
        assert [type(f) for f in chain] == expected
        assert all(f.get_prop(FilterContextKey.SOURCE) == FilterSource.SITE for f in chain)
    dp = mgr.name_to_scopes["fuss-dp"].task_result_filters["out"][2]
    assert (dp.clip, dp.noise_multiplier) == (1.0, 1.0)

    # the site-level ExcludeVars keeps exactly head.* and centroids
    exclude = mgr.name_to_scopes["fuss"].task_result_filters["out"][0]
    data = {"head.linear.weight": torch.ones(1), "centroids": torch.ones(1), "backbone.w": torch.ones(1),
            "centroids_raw": torch.ones(1), "x.head.y": torch.ones(1)}
    out = from_shareable(exclude.process(DXO(DataKind.WEIGHTS, data=data).to_shareable(), FLContext()))
    assert sorted(out.data) == ["centroids", "head.linear.weight"]
