"""Centroid privacy without a federation: the math in ``fuss_components.privacy`` (clipping, noise, sensitivity,
(epsilon, delta) of the Gaussian mechanism, composition), the two result filters on FLARE objects (what they
change, what they write to the audit log), the job options that configure them, and the site policy example
``poc/privacy.json`` as FLARE itself parses it. The filters inside a running federation: ``tests/test_poc.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import FilterChainType, FilterContextKey, FilterSource
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.sec.audit import AuditService
from scipy.stats import norm

from fuss_components import privacy as P
from fuss_components.config import FussConfig
from fuss_flare import CONFIG_FILE
from fuss_flare.filters import CentroidPrivacyFilter, FussResultFilter
from fuss_flare.job import main as job_main

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the math


def test_clip_rows_scales_only_rows_above_the_norm():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    clipped, n = P.clip_rows(x, 1.0)
    assert n == 2
    assert torch.allclose(clipped.norm(dim=1), torch.tensor([1.0, 0.5, 0.0, 1.0]))
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8]))  # direction kept
    assert torch.equal(clipped[1], x[1]) and torch.equal(clipped[2], x[2])
    with pytest.raises(ValueError):
        P.clip_rows(x, 0.0)


def test_privatize_adds_gaussian_noise_of_std_sigma_times_clip():
    x = torch.randn(400, 70) * 3
    clipped, _ = P.clip_rows(x, 0.5)
    out, n = P.privatize_centroids(x, 0.5, 2.0, torch.Generator().manual_seed(1))
    assert n == 400 and out.shape == x.shape and out.dtype == x.dtype
    noise = (out - clipped).double().flatten()
    assert abs(float(noise.mean())) < 4 * 1.0 / math.sqrt(noise.numel())  # std of the mean: sigma*C/sqrt(n)
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03)  # sigma * C = 2.0 * 0.5
    same, _ = P.privatize_centroids(x, 0.5, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, same)  # a given generator is reproducible ...
    a, _ = P.privatize_centroids(x, 0.5, 2.0)
    b, _ = P.privatize_centroids(x, 0.5, 2.0)
    assert not torch.equal(a, b)  # ... without one, every call draws fresh OS entropy
    zero, _ = P.privatize_centroids(x, 0.5, 0.0)
    assert torch.equal(zero, clipped)


def test_sensitivity_bounds_every_pair_of_clipped_matrices_and_is_attained():
    k, d, c = 5, 7, 0.8
    delta2 = P.l2_sensitivity(k, c)
    assert delta2 == pytest.approx(2 * c * math.sqrt(k))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # any two data sets, however different: the clipped outputs are within Delta_2
        a, _ = P.clip_rows(torch.randn(k, d, generator=gen) * 5, c)
        b, _ = P.clip_rows(torch.randn(k, d, generator=gen) * 5, c)
        assert float((a - b).norm()) <= delta2 + 1e-6
    a, _ = P.clip_rows(torch.ones(k, d), c)
    assert float((a - (-a)).norm()) == pytest.approx(delta2, rel=1e-6)  # antipodal rows: the bound is tight


def test_gaussian_mechanism_epsilon_delta():
    # delta at epsilon = 0 of a mu-GDP mechanism is the total variation Phi(mu/2) - Phi(-mu/2)
    assert P.gaussian_delta(1.0, 0.0) == pytest.approx(norm.cdf(0.5) - norm.cdf(-0.5), abs=1e-12)
    for mu in (0.1, 0.5, 1.0, 3.0, 20.0):
        for eps in (0.1, 1.0, 5.0):
            delta = P.gaussian_delta(mu, eps)
            if 1e-300 < delta < 1:
                assert P.gaussian_epsilon(mu, delta) == pytest.approx(eps, rel=1e-6)  # exact inverse
    # the analytic bound is never worse than the classical one where the classical one is valid (epsilon < 1)
    for std in (5.0, 10.0, 40.0):
        classical = P.classical_gaussian_epsilon(1.0, std, 1e-5)
        if classical < 1:
            assert P.gaussian_epsilon(1.0 / std, 1e-5) <= classical
    # more noise: less epsilon; no noise: no guarantee
    eps = [P.account(11, 1.0, s, 1e-5).epsilon for s in (0.5, 1, 2, 5, 10, 30)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert math.isinf(P.account(11, 1.0, 0.0).epsilon)
    with pytest.raises(ValueError):
        P.gaussian_epsilon(1.0, 0.0)


def test_account_per_round_and_composed():
    acc = P.account(num_clusters=11, clip=2.0, noise_multiplier=10.0, delta=1e-5, rounds=10)
    assert acc.sensitivity == pytest.approx(4 * math.sqrt(11))
    assert acc.noise_std == pytest.approx(20.0)
    assert acc.mu == pytest.approx(2 * math.sqrt(11) / 10)  # independent of C
    assert acc.epsilon == pytest.approx(P.account(11, 0.1, 10.0, 1e-5).epsilon)
    assert (acc.total_epsilon, acc.total_delta) == pytest.approx((10 * acc.epsilon, 1e-4))  # simple composition
    assert acc.total_epsilon_gdp < acc.total_epsilon  # sqrt(R) mu -GDP is tighter
    assert acc.total_epsilon_gdp == pytest.approx(P.gaussian_epsilon(math.sqrt(10) * acc.mu, 1e-4))
    text = acc.summary()
    assert "2*C*sqrt(K)" in text and "after 10 round(s)" in text and "simple composition" in text
    assert set(acc.to_dict()) >= {"epsilon", "delta", "total_epsilon", "total_delta", "sensitivity"}


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


def test_result_filter_writes_its_audit_line(audit_log):
    _, shareable = _train_result(torch.randn(3, 4))
    shareable_dxo = from_shareable(shareable)
    shareable_dxo.data["backbone.x"] = torch.zeros(1)
    shareable = shareable_dxo.to_shareable()
    out = _as_job_filter(FussResultFilter()).process(shareable, FLContext())
    assert out.get_return_code(ReturnCode.OK) == ReturnCode.OK
    (line,) = audit_log.read_text().splitlines()
    assert "applied filter: FussResultFilter@job on task_result: WEIGHTS 3 item(s) sent" in line
    assert "1 dropped: data['backbone.x']" in line


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
    assert FussConfig.load(job / "app" / "custom" / CONFIG_FILE).federation.rounds == 4


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
