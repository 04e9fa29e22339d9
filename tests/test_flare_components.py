"""The FLARE layer without the simulator: the public FLARE API it is built on, ``FussAggregator`` on real FLARE
objects (screening, identities, validation-only results, the census counts, ``SCREENING_DONE``, hostile rounds,
arrival order, the robust mode), the job configuration a site and the server read and validate, the job generator
and its command line, the committed job folders and the simulator workspace's class allow list. The site filters:
``test_flare_filters.py``; the centroid privacy filter: ``test_flare_privacy.py``."""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import itertools
import json
import logging
import math
import textwrap
from pathlib import Path

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from fuss_components.aggregation import (AggregationError, ClientUpdate, aggregate, centroid_drift, normalize_rows,
                                        robust_average_states)
from fuss_components.config import ConfigError, FussConfig
from fuss_components.head import FussModel, split_state
from fuss_components.presets import PRESETS
from fuss_flare import (
    ALL_TASKS,
    CONFIG_FILE,
    DECLARED_COUNTS_PROP,
    META_NUM_SAMPLES,
    META_SITE,
    SCREENING_DONE,
    SCREENING_REPORT,
    SESSION_CLIENT_HEADER,
    load_job_config,
    load_site_config,
)
from fuss_flare.aggregator import FussAggregator
from fuss_flare.job import COMMITTED, export_committed, main

REPO = Path(__file__).resolve().parents[1]
LAYER = REPO / "custom" / "fuss_flare"


# ---------------------------------------------------------------------------------------------- the FLARE API


def _layer_trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(LAYER.glob("*.py"))}


def _layer_module(stem: str):
    return importlib.import_module("fuss_flare" if stem == "__init__" else f"fuss_flare.{stem}")


def _is_flare(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "nvflare"


def _flare_imports() -> set[tuple[str, str | None]]:
    """(module, name) of every ``from nvflare... import name`` / ``import nvflare...`` of the layer, the imports
    inside functions included."""
    found: set[tuple[str, str | None]] = set()
    for tree in _layer_trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nvflare":
                found.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "nvflare")
    return found


def test_flare_is_the_2_9_line():
    import nvflare

    assert nvflare.__version__.startswith("2.9"), nvflare.__version__


def test_every_flare_name_the_layer_imports_exists():
    imports = _flare_imports()
    assert len(imports) > 30, sorted(imports, key=str)  # the scan sees the layer's imports (also the lazy ones)
    assert ("nvflare.app_common.workflows.scatter_and_gather", "ScatterAndGather") in imports
    missing = []
    for module, name in sorted(imports, key=str):
        try:
            found = importlib.import_module(module)
            if name is not None and not hasattr(found, name):
                importlib.import_module(f"{module}.{name}")  # a submodule, e.g. nvflare.fuel.utils.fobs
        except ImportError as err:
            missing.append(f"{module}.{name}: {err}")
    assert not missing


def test_the_flare_base_classes_the_layer_extends():
    from nvflare.apis.executor import Executor
    from nvflare.app_common.abstract.aggregator import Aggregator

    assert Aggregator.__abstractmethods__ == {"accept", "aggregate"}
    for method, params in (("accept", ["self", "shareable", "fl_ctx"]), ("aggregate", ["self", "fl_ctx"]),
                           ("reset", ["self", "fl_ctx"])):  # reset: a no-op FussAggregator overrides
        assert list(inspect.signature(getattr(Aggregator, method)).parameters) == params, method
    assert Executor.__abstractmethods__ == {"execute"}
    assert list(inspect.signature(Executor.execute).parameters) == ["self", "task_name", "shareable", "fl_ctx",
                                                                    "abort_signal"]


def _layer_classes():
    """(module stem, class node, class) of every class of the layer that extends a FLARE class."""
    for stem, tree in _layer_trees().items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                cls = getattr(_layer_module(stem), node.name)
                if any(_is_flare(base) for base in cls.__mro__[1:]):
                    yield stem, node, cls


def _super_init_call(class_node: ast.ClassDef) -> ast.Call | None:
    for node in class_node.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            for call in ast.walk(node):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "__init__" and isinstance(call.func.value, ast.Call)
                        and getattr(call.func.value.func, "id", None) == "super"):
                    return call
    return None


def _accepts(func, n_positional: int, keywords: list[str]) -> str | None:
    """Why ``func`` cannot be called with ``n_positional`` arguments and ``keywords``, or None."""
    try:
        inspect.signature(func).bind(*[None] * n_positional, **{k: None for k in keywords})
    except TypeError as err:
        return str(err)
    return None


def test_the_layer_calls_flare_constructors_and_methods_with_arguments_they_accept():
    """Every ``super().__init__(...)`` of a FUSS class, every call of a FLARE name the layer imports and every
    ``self.<FLARE method>(...)`` binds to the installed FLARE's signatures (a renamed argument fails here, not
    in a federation)."""
    problems, checked = [], set()
    classes = {node.name: (stem, cls) for stem, node, cls in _layer_classes()}
    assert {"FussController", "FussAggregator", "FussExecutor", "FussRecorder", "FussModelPersistor",
            "FussResultFilter", "CentroidPrivacyFilter", "FussAnalyticsForwarder"} <= set(classes)
    for stem, class_node, cls in _layer_classes():
        call = _super_init_call(class_node)
        if call is not None and not any(isinstance(a, ast.Starred) for a in call.args):
            base = cls.__mro__[1]
            why = _accepts(base.__init__, 1 + len(call.args), [k.arg for k in call.keywords if k.arg])
            problems += [f"{cls.__name__} -> {base.__name__}.__init__: {why}"] if why else []
            checked.add(f"{cls.__name__}.super")
        for call in ast.walk(class_node):  # self.<method>(...) that FLARE defines
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and getattr(call.func.value, "id", None) == "self"):
                continue
            method = inspect.getattr_static(cls, call.func.attr, None)
            if not inspect.isfunction(method) or not _is_flare(method):
                continue
            if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                continue
            why = _accepts(method, 1 + len(call.args), [k.arg for k in call.keywords])
            problems += [f"{cls.__name__}.{call.func.attr}: {why}"] if why else []
            checked.add(f"{cls.__name__}.{call.func.attr}")
    for stem, tree in _layer_trees().items():  # calls of imported FLARE names: Task(...), DXO(...), FedJob(...)
        imported = {alias.asname or alias.name: getattr(importlib.import_module(node.module), alias.name, None)
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").split(".")[0] == "nvflare" for alias in node.names}
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                continue
            target = imported.get(call.func.id)
            if target is None or not _is_flare(target) or not callable(target):
                continue
            if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                continue
            why = _accepts(target, len(call.args), [k.arg for k in call.keywords])
            problems += [f"{stem}: {call.func.id}(...): {why}"] if why else []
            checked.add(call.func.id)
    assert not problems
    # the calls that matter most were among those checked
    assert {"FussController.super", "FussModelPersistor.super", "FussController.broadcast_and_wait",
            "FussAggregator.fire_event", "Task", "DXO", "create_analytic_dxo", "FussJob.super", "FussRecipe.super"} <= checked, sorted(checked)


def test_the_layer_overrides_flare_methods_with_their_signatures():
    overridden = {}
    for _, class_node, cls in _layer_classes():
        for node in class_node.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            base_method = next((vars(b)[node.name] for b in cls.__mro__[1:] if _is_flare(b) and node.name in vars(b)),
                               None)
            if inspect.isfunction(base_method):
                overridden[f"{cls.__name__}.{node.name}"] = (list(inspect.signature(vars(cls)[node.name]).parameters),
                                                             list(inspect.signature(base_method).parameters))
    assert {"FussController.control_flow", "FussController.start_controller", "FussAggregator.accept",
            "FussAggregator.aggregate", "FussAggregator.reset", "FussExecutor.execute",
            "FussResultFilter.process", "FussRecorder.handle_event"} <= set(overridden)
    assert {name: ours for name, (ours, theirs) in overridden.items() if ours != theirs} == {}


# The one private FLARE step the layer overrides, and why: only it knows which client's session delivered a train
# result (the aggregator keys results by it). Its signature is pinned below, so a FLARE release that changes it
# fails here, not silently in a federation.
PRIVATE_FLARE_HOOKS = {"controller": {"super()._accept_train_result"}}


def test_the_one_private_flare_step_the_layer_overrides_keeps_its_signature():
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

    from fuss_flare.controller import FussController

    ours, theirs = FussController._accept_train_result, ScatterAndGather._accept_train_result
    assert ours is not theirs
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters) == \
        ["self", "client_name", "result", "fl_ctx", "is_unknown_task"]
    # and FLARE still hands every train result to the aggregator through it
    source = inspect.getsource(ScatterAndGather)
    assert "self._accept_train_result(client_name=client_name, result=result, fl_ctx=fl_ctx)" in source
    assert "self.aggregator.accept(result, fl_ctx)" in inspect.getsource(theirs)


def test_the_layer_uses_no_private_member_of_flare():
    """Every ``self._x`` a FUSS class touches is its own (assigned or defined in its file) and is no private name
    of its FLARE bases; and no module reaches into another object's ``_x`` (except ``PRIVATE_FLARE_HOOKS``). FLARE's
    private members change between releases without notice."""
    foreign, flare_private_of = [], {}
    for stem, class_node, cls in _layer_classes():
        used, own = set(), set()
        for node in ast.walk(class_node):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                used.add(node.attr)
                if isinstance(node.ctx, ast.Store):
                    own.add(node.attr)
            elif isinstance(node, ast.FunctionDef):
                own.add(node.name)
        flare_private = set()
        for base in cls.__mro__[1:]:
            if _is_flare(base):
                for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(base)))):
                    if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self":
                        flare_private.add(node.attr)
                    elif isinstance(node, ast.FunctionDef):
                        flare_private.add(node.name)
        flare_private = flare_private_of[cls.__name__] = {n for n in flare_private
                                                          if n.startswith("_") and not n.startswith("__")}
        foreign += [f"{stem}.{cls.__name__}: self.{n} (not its own)" for n in sorted(used - own)]
        foreign += [f"{stem}.{cls.__name__}: self.{n} (a FLARE private name)" for n in sorted(used & flare_private)]
    for stem, tree in _layer_trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and getattr(node.value, "id", None) != "self" \
                    and ast.unparse(node) not in PRIVATE_FLARE_HOOKS.get(stem, set()):
                foreign.append(f"{stem}: {ast.unparse(node)}")
    assert foreign == []
    # the scan reads FLARE's classes: e.g. the controller's engine and round state are FLARE's private members
    assert {"_engine", "_current_round", "_global_weights"} <= flare_private_of["FussController"]


# ---------------------------------------------------------------------------------------------- aggregator


def model_state(seed: int, clusters: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in FussModel(6, 4, clusters, 0.0).state_dict().items()}


GLOBAL_SEED = 99  # the global model of `make_aggregator`


def near_global(seed: int) -> dict[str, torch.Tensor]:
    """A plausible site result: the global model moved a little (screening rejects a head that moved more than
    federation.max_relative_change x the global head's norm)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model_state(GLOBAL_SEED).items()}


def far_from_global() -> dict[str, torch.Tensor]:
    """A result whose head moved 3 x the global head's norm (4 x the global head): screened out."""
    return {k: 4 * v if k.startswith("head.") else v for k, v in model_state(GLOBAL_SEED).items()}


def train_result(client: str, state: dict, num_samples, site: str | None = None, metrics: dict | None = None,
                 session: str | None = None) -> Shareable:
    """A site's ``train`` result as FussExecutor sends it, as the aggregator receives it from the FLARE client
    ``client`` (the identity in its peer context), stamped by FussController with the client of the session that
    delivered it (``session``, default: ``client``). ``site``: the name the meta declares (default: ``client``);
    ``num_samples=None`` leaves the count out."""
    meta = {META_SITE: client if site is None else site, MetaKey.INITIAL_METRICS: metrics or {"loss_self": 0.5}}
    if num_samples is not None:
        meta[META_NUM_SAMPLES] = num_samples
    shareable = DXO(DataKind.WEIGHTS, data=state, meta=meta).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: client})
    shareable.set_header(SESSION_CLIENT_HEADER, client if session is None else session)
    return shareable


class EventLog:
    """The server engine as far as ``FLComponent.fire_event`` uses it: records every event with the screening
    report in the FLContext at that moment."""

    def __init__(self):
        self.events: list[tuple[str, dict | None]] = []

    def fire_event(self, event_type: str, fl_ctx: FLContext):
        self.events.append((event_type, copy.deepcopy(fl_ctx.get_prop(SCREENING_REPORT))))

    def screening_reports(self) -> list[dict]:
        return [report for event, report in self.events if event == SCREENING_DONE]


def make_aggregator(tmp_path, aggregator="fedavg", min_clients=None, declared_counts=None, **federation):
    """A started ``FussAggregator`` and the server FLContext of round 4: app root with ``config/fuss_config.json``,
    the global model ``model_state(GLOBAL_SEED)``, the census counts (None: no census), an ``EventLog`` engine."""
    cfg = FussConfig.from_dict({"federation": {"aggregator": aggregator, "min_clients": min_clients, **federation}})
    cfg.save(tmp_path / "config" / CONFIG_FILE)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, EventLog(), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(model_state(GLOBAL_SEED), {}), private=True,
                    sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    if declared_counts is not None:
        fl_ctx.set_prop(DECLARED_COUNTS_PROP, dict(declared_counts), private=True, sticky=False)
    agg = FussAggregator()
    agg.handle_event(EventType.START_RUN, fl_ctx)
    return cfg, agg, fl_ctx


def screening_report(fl_ctx: FLContext) -> dict:
    return fl_ctx.get_prop(SCREENING_REPORT)


def without_drift(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "drift"}


def aggregated(agg: FussAggregator, fl_ctx: FLContext) -> dict[str, torch.Tensor]:
    dxo = from_shareable(agg.aggregate(fl_ctx))
    assert dxo.data_kind == DataKind.WEIGHTS
    return dxo.data


def _equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("aggregator", ["fedavg", "fedcc-kmeans", "fedcc-maximin"])
def test_aggregator_result_is_the_library_rule(tmp_path, aggregator):
    counts = {"site-b": 4, "site-a": 7, "site-c": 5}
    cfg, agg, fl_ctx = make_aggregator(tmp_path, aggregator, declared_counts={c: 10 for c in counts})
    states = {client: near_global(i) for i, client in enumerate(counts)}
    for client, state in states.items():
        assert agg.accept(train_result(client, state, counts[client]), fl_ctx)
    out = aggregated(agg, fl_ctx)
    updates = [ClientUpdate(c, *split_state(s), counts[c]) for c, s in states.items()]
    head, centroids = aggregate(updates, cfg.federation, 3)
    assert _equal_states(out, {**{"head." + k: v for k, v in head.items()}, "centroids": centroids})
    assert not any(_equal_states(out, s) for s in states.values())  # an aggregate, not one site's model
    report = screening_report(fl_ctx)
    assert report.pop("drift") == pytest.approx(centroid_drift(updates, cfg.federation, 3))  # recorded per round
    assert report == {"accepted": ["site-a", "site-b", "site-c"], "rejected": []}


def test_aggregator_rejects_bad_updates_with_reasons_and_averages_the_rest(tmp_path, caplog):
    good = near_global(1)
    batch = {
        "site-good": good,
        "site-nan": dict(near_global(2), centroids=torch.full((3, 4), math.nan)),
        "site-extra": dict(near_global(3), centroids=torch.randn(4, 4)),
        "site-shape": dict(near_global(4), **{"head.linear.weight": torch.zeros(2, 2)}),
        "site-far": far_from_global(),
        "site-no-centroids": {k: v for k, v in near_global(5).items() if k != "centroids"},
    }
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=1)
    with caplog.at_level(logging.WARNING):
        accepted = {client: agg.accept(train_result(client, state, 5), fl_ctx) for client, state in batch.items()}
        out = aggregated(agg, fl_ctx)
    assert accepted.pop("site-no-centroids") is False  # split_state refuses it on arrival
    assert all(accepted.values())  # the others are screened together in aggregate
    report = screening_report(fl_ctx)
    reasons = dict(report["rejected"])
    assert report["accepted"] == ["site-good"] and len(reasons) == len(batch) - 1
    assert "centroids contain NaN or Inf" in reasons["site-nan"]
    assert "centroids have shape (4, 4), expected (3, 4)" in reasons["site-extra"]
    assert "head['linear.weight'] has shape (2, 2)" in reasons["site-shape"]
    assert "federation.max_relative_change=1.5" in reasons["site-far"]
    assert "centroids" in reasons["site-no-centroids"]
    for client in reasons:
        assert f"round 4: rejected the update of {client}" in caplog.text
    assert torch.allclose(out["head.linear.weight"], good["head.linear.weight"])


def test_aggregator_needs_min_clients_or_every_declared_training_site(tmp_path):
    declared = {"site-1": 5, "site-2": 5}
    nan = dict(near_global(2), **{"head.linear.bias": torch.full((4,), math.nan)})
    # min_clients unset: every training site of the census must deliver a usable update
    _, agg, fl_ctx = make_aggregator(tmp_path, declared_counts=declared)
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)
    agg.accept(train_result("site-2", nan, 5), fl_ctx)
    with pytest.raises(AggregationError, match=r"round 4: 1 acceptable update\(s\) \['site-1'\], fewer than "
                                               r"min_clients=2; rejected: .*site-2.*NaN"):
        agg.aggregate(fl_ctx)
    # the failed round is forgotten: the next round takes the same sites again
    for client in declared:
        assert agg.accept(train_result(client, near_global(3), 5), fl_ctx)
    aggregated(agg, fl_ctx)
    assert without_drift(screening_report(fl_ctx)) == {"accepted": ["site-1", "site-2"], "rejected": []}
    # an explicit min_clients, without a census
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=2)
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)
    with pytest.raises(AggregationError, match=r"1 acceptable update\(s\).*min_clients=2"):
        agg.aggregate(fl_ctx)
    # nothing received at all: a clear error, never an index into an empty list
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1)
    with pytest.raises(AggregationError, match=r"0 acceptable update\(s\) \[\]"):
        agg.aggregate(fl_ctx)


def test_aggregator_keys_results_by_the_authenticated_identity(tmp_path):
    cfg, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1)
    honest = near_global(1)
    assert agg.accept(train_result("site-1", honest, 5), fl_ctx)
    # site-2 claims to be site-1: rejected on arrival with a reason naming both names
    assert not agg.accept(train_result("site-2", near_global(2), 50, site="site-1"), fl_ctx)
    # a second result of the same client in one round: the first one counts
    assert not agg.accept(train_result("site-1", near_global(3), 5), fl_ctx)
    # no declared site at all: keyed by the identity
    undeclared = DXO(DataKind.WEIGHTS, data=near_global(4), meta={META_NUM_SAMPLES: 5}).to_shareable()
    undeclared.set_peer_props({ReservedKey.IDENTITY_NAME: "site-3"})
    undeclared.set_header(SESSION_CLIENT_HEADER, "site-3")
    assert agg.accept(undeclared, fl_ctx)
    # site-4's session delivers a result whose peer identity and meta both say site-1 (a hostile peer that
    # rewrote its context, or a client process started under the wrong name): keyed by the session, rejected
    assert not agg.accept(train_result("site-1", near_global(5), 5, session="site-4"), fl_ctx)
    # a result the controller never stamped (another controller, or a forged path around it): rejected
    unstamped = train_result("site-5", near_global(6), 5)
    unstamped.set_header(SESSION_CLIENT_HEADER, None)
    assert not agg.accept(unstamped, fl_ctx)
    out = aggregated(agg, fl_ctx)
    report = screening_report(fl_ctx)
    assert report["accepted"] == ["site-1", "site-3"]
    (impostor, reason_impostor), (repeat, reason_repeat), (mixed, reason_mixed), (unknown, reason_unstamped) = \
        report["rejected"]
    assert impostor == "site-2" and "'site-1'" in reason_impostor and "'site-2'" in reason_impostor
    assert repeat == "site-1" and "second result" in reason_repeat
    assert mixed == "site-4" and "session of 'site-4'" in reason_mixed and "identity 'site-1'" in reason_mixed
    assert unknown == "site-5" and "no session client" in reason_unstamped
    updates = [ClientUpdate("site-1", *split_state(honest), 5), ClientUpdate("site-3", *split_state(near_global(4)), 5)]
    head, _ = aggregate(updates, cfg.federation, 3)
    assert torch.equal(out["head.linear.weight"], head["linear.weight"])


def _site_info(data) -> Shareable:
    return DXO(DataKind.METRICS, data=data).to_shareable()


@pytest.mark.parametrize("data, role", [
    ({"is_training_site": True, "is_validation_site": False, "num_samples": 12},
     {"is_training_site": True, "is_validation_site": False, "num_samples": 12}),
    ({"is_training_site": 1.0, "is_validation_site": 1.0, "num_samples": 12.0},  # as metrics may travel
     {"is_training_site": True, "is_validation_site": True, "num_samples": 12}),
    ({"is_validation_site": True},  # a validation-only site need not send a count
     {"is_training_site": False, "is_validation_site": True, "num_samples": 0}),
    ({"is_training_site": "yes", "is_validation_site": 2, "num_samples": 3},  # only True / 1.0 is a role
     {"is_training_site": False, "is_validation_site": False, "num_samples": 3}),
])
def test_the_census_reads_a_sites_roles_and_count(data, role):
    from fuss_flare.controller import read_site_info

    assert read_site_info(_site_info(data)) == role


@pytest.mark.parametrize("count", [True, -1, 2.5, 2**53, float("nan"), float("inf"), "12", None, [3]])
def test_the_census_refuses_a_count_that_is_not_a_whole_number_of_images(count):
    from fuss_flare.controller import read_site_info

    with pytest.raises(ValueError, match="not a whole number of images"):
        read_site_info(_site_info({"is_training_site": True, "num_samples": count}))


def test_a_validation_only_result_is_accepted_and_not_averaged(tmp_path):
    cfg, agg, fl_ctx = make_aggregator(tmp_path, declared_counts={"site-1": 5, "site-2": 6})
    states = {"site-1": near_global(1), "site-2": near_global(2)}
    for client, state in states.items():
        assert agg.accept(train_result(client, state, 5 if client == "site-1" else 6), fl_ctx)
    validation = train_result("val", {}, 0, metrics={"miou": 0.4, "pixel_acc": 0.8, "num_images": 3})
    assert agg.accept(validation, fl_ctx)
    out = aggregated(agg, fl_ctx)
    assert without_drift(screening_report(fl_ctx)) == {"accepted": ["site-1", "site-2"], "rejected": []}
    updates = [ClientUpdate(c, *split_state(s), n) for (c, s), n in zip(states.items(), (5, 6))]
    head, centroids = aggregate(updates, cfg.federation, 3)
    assert torch.equal(out["centroids"], centroids) and torch.equal(out["head.linear.bias"], head["linear.bias"])
    # zero samples with parameters is no validation result: screened and rejected
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1)
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)
    assert agg.accept(train_result("site-2", near_global(2), 0), fl_ctx)
    aggregated(agg, fl_ctx)
    (site, reason), = screening_report(fl_ctx)["rejected"]
    assert site == "site-2" and "num_samples must be > 0, got 0" in reason


def test_aggregator_holds_each_site_to_the_count_it_declared_in_the_census(tmp_path):
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1, declared_counts={"site-1": 5, "site-2": 5})
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)  # exactly what it declared: fine
    agg.accept(train_result("site-2", near_global(2), 9), fl_ctx)
    agg.accept(train_result("site-9", near_global(3), 1), fl_ctx)  # not in the census
    aggregated(agg, fl_ctx)
    reasons = dict(screening_report(fl_ctx)["rejected"])
    assert screening_report(fl_ctx)["accepted"] == ["site-1"]
    assert "num_samples 9 exceeds the 5 it declared when the job started" in reasons["site-2"]
    assert "did not declare a sample count when the job started" in reasons["site-9"]
    # control: without a census the same counts pass
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1)
    agg.accept(train_result("site-2", near_global(2), 9), fl_ctx)
    agg.accept(train_result("site-9", near_global(3), 1), fl_ctx)
    aggregated(agg, fl_ctx)
    assert screening_report(fl_ctx)["accepted"] == ["site-2", "site-9"]


def test_screening_done_carries_the_report_also_when_the_round_fails(tmp_path):
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=1)
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)
    agg.accept(train_result("site-2", far_from_global(), 5), fl_ctx)
    aggregated(agg, fl_ctx)
    engine = fl_ctx.get_engine()
    (report,) = engine.screening_reports()
    assert report["accepted"] == ["site-1"] and [s for s, _ in report["rejected"]] == ["site-2"]
    assert json.loads(json.dumps(report)) == report  # the recorder writes it to metrics.json as it is
    # a failed round is reported before the error
    _, agg, fl_ctx = make_aggregator(tmp_path, min_clients=2)
    agg.accept(train_result("site-1", near_global(1), 5), fl_ctx)
    with pytest.raises(AggregationError):
        agg.aggregate(fl_ctx)
    reports = fl_ctx.get_engine().screening_reports()
    assert [without_drift(r) for r in reports] == [{"accepted": ["site-1"], "rejected": []}]


def test_flare_aggregator_result_does_not_depend_on_arrival_order(tmp_path):
    outs = []
    order = [("site-1", 1, 4), ("site-2", 2, 7), ("site-3", 3, 5)]
    for perm in itertools.permutations(order):
        _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", declared_counts={c: n for c, _, n in order})
        for client, seed, n in perm:
            assert agg.accept(train_result(client, near_global(seed), n), fl_ctx)
        outs.append(aggregated(agg, fl_ctx))
    assert all(_equal_states(o, outs[0]) for o in outs[1:])
    # control: other sample counts give another model (so the comparison above can fail)
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=3)
    for client, seed, n in order:
        assert agg.accept(train_result(client, near_global(seed), 1 if client == "site-2" else n), fl_ctx)
    assert not _equal_states(aggregated(agg, fl_ctx), outs[0])


def _hostile_batch():
    """Three good updates and one of every hostile kind the issue lists, as (FLARE client, state, num_samples,
    declared site); every client is its own authenticated FLARE identity."""
    good = [("g1", near_global(1), 5, None), ("g2", near_global(2), 6, None), ("g3", near_global(3), 7, None)]
    ref = model_state(GLOBAL_SEED)
    huge = {k: ref[k] + 1e6 * (v - ref[k]) if k.startswith("head.") else v for k, v in near_global(4).items()}
    bad = [
        ("shape", dict(near_global(5), **{"head.linear.weight": torch.zeros(2, 2)}), 5, None),
        ("clusters", dict(near_global(6), centroids=torch.randn(4, 4)), 5, None),
        ("nan", dict(near_global(7), **{"head.linear.bias": torch.full((4,), math.nan)}), 5, None),
        ("inf", dict(near_global(8), centroids=torch.full((3, 4), math.inf)), 5, None),
        ("norm", huge, 5, None),
        ("missing_n", near_global(9), None, None),
        ("negative_n", near_global(10), -4, None),
        ("overclaim", near_global(11), 50, None),  # more images than it declared in the census
        ("impostor", near_global(12), 5, "g1"),  # declares another site's name
        ("g2", near_global(13), 6, None),  # a second result of g2 in the round
    ]
    return good, bad


EXPECTED_REASON = {
    "shape": "head['linear.weight'] has shape (2, 2)",
    "clusters": "centroids have shape (4, 4), expected (3, 4)",
    "nan": "contains NaN",
    "inf": "centroids contain NaN or Inf",
    "norm": "federation.max_relative_change",
    "missing_n": "num_samples is missing",
    "negative_n": "num_samples must be > 0",
    "overclaim": "num_samples 50 exceeds the 5 it declared when the job started",
    "impostor": "declares site 'g1' but FLARE authenticated it as 'impostor'",
    "g2": "sent a second result in this round",
}


@pytest.mark.parametrize("min_clients, proceeds", [(3, True), (4, False)])
def test_flare_aggregator_rejects_every_hostile_update_naming_the_site(tmp_path, caplog, min_clients, proceeds):
    """All hostile kinds in one round: each is rejected with a logged reason naming its FLARE client. g2's first
    result counts, so 3 good updates remain: the round proceeds with min_clients=3 and fails with a clear message
    with min_clients=4."""
    good, bad = _hostile_batch()
    declared = {client: 5 for client, *_ in bad} | {client: n for client, _, n, _ in good}
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=min_clients, declared_counts=declared)
    with caplog.at_level(logging.WARNING):
        for client, state, n, site in good + bad:
            agg.accept(train_result(client, state, n, site=site), fl_ctx)
        if proceeds:
            out = aggregated(agg, fl_ctx)
        else:
            with pytest.raises(AggregationError) as err:
                agg.aggregate(fl_ctx)
    report = screening_report(fl_ctx)
    reasons = dict(report["rejected"])
    assert report["accepted"] == ["g1", "g2", "g3"]
    assert len(report["rejected"]) == len(bad) and set(reasons) == set(EXPECTED_REASON)
    for client, expected in EXPECTED_REASON.items():
        assert expected in reasons[client], (client, reasons[client])
        assert f"round 4: rejected the update of {client}: " in caplog.text
    if proceeds:
        head, centroids = split_state(out)
        assert torch.isfinite(centroids).all() and centroids.shape == (3, 4)
    else:
        assert "3 acceptable update(s) ['g1', 'g2', 'g3'], fewer than min_clients=4" in str(err.value)


def test_flare_aggregator_applies_the_robust_mode_of_the_job(tmp_path, caplog):
    """The job's federation.robust reaches the FLARE aggregator: flipped centroids rejected (logged, naming the
    site), the head is the coordinate-wise median of the rest."""
    cfg, agg, fl_ctx = make_aggregator(tmp_path, "fedavg", min_clients=1, robust="median")
    g = torch.Generator().manual_seed(0)
    base = normalize_rows(torch.randn(3, 4, generator=g))
    honest = [dict(near_global(i), centroids=base + 0.05 * torch.randn(3, 4, generator=g)) for i in range(4)]
    evil = dict(near_global(9), centroids=-base)
    with caplog.at_level(logging.WARNING):
        for i, state in enumerate(honest + [evil]):
            agg.accept(train_result(f"s{i}" if i < 4 else "evil", state, 5 + i), fl_ctx)
        out = aggregated(agg, fl_ctx)
    report = screening_report(fl_ctx)
    assert report["accepted"] == ["s0", "s1", "s2", "s3"]
    assert [s for s, _ in report["rejected"]] == ["evil"]
    assert "rejected the update of evil" in caplog.text and "centroids lie" in caplog.text
    updates = [ClientUpdate(f"s{i}", *split_state(st), 5 + i) for i, st in enumerate(honest)]
    head, centroids = aggregate(updates, cfg.federation, 3)
    assert all(torch.equal(out["head." + k], v) for k, v in head.items()) and torch.equal(out["centroids"], centroids)
    median = robust_average_states([u.head for u in updates], "median")
    assert torch.equal(head["linear.weight"], median["linear.weight"])


# ---------------------------------------------------------------------------------------------- job config


def _app_context(app_root: Path) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    return fl_ctx


def test_site_config_is_the_job_config_with_the_site_overrides(tmp_path, monkeypatch):
    FussConfig.from_dict({"federation": {"rounds": 3}}).save(tmp_path / "app" / "config" / CONFIG_FILE)
    fl_ctx = _app_context(tmp_path / "app")
    monkeypatch.delenv("FUSS_SITE_CONFIG", raising=False)
    assert load_site_config(fl_ctx) == load_job_config(fl_ctx)
    overrides = tmp_path / "site.json"
    overrides.write_text(json.dumps({"data.root": "/data/fuss", "cache_dir": "/scratch/fuss"}))
    monkeypatch.setenv("FUSS_SITE_CONFIG", str(overrides))
    site = load_site_config(fl_ctx)
    assert (site.data.root, site.cache_dir, site.federation.rounds) == ("/data/fuss", "/scratch/fuss", 3)
    assert load_job_config(fl_ctx).data.root is None  # the server reads the job's config only
    overrides.write_text(json.dumps({"train.nope": 1}))
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_site_config(fl_ctx)
    with pytest.raises(RuntimeError, match="no app root"):
        load_job_config(FLContext())


def test_flare_site_and_server_validate_the_job_config(tmp_path, monkeypatch):
    """The site (``load_site_config``) and the server components (``load_job_config``) read the job's
    ``config/fuss_config.json`` through FussConfig.load (validated); a site's own overrides are validated too."""
    (tmp_path / "config").mkdir()
    job_config = tmp_path / "config" / "fuss_config.json"
    job_config.write_text(json.dumps({"federation": {"robust": "median", "trim_fraction": 0.9}}))
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    monkeypatch.delenv("FUSS_SITE_CONFIG", raising=False)
    for load in (load_site_config, load_job_config):
        with pytest.raises(ConfigError, match=r"federation\.trim_fraction"):
            load(fl_ctx)
    job_config.write_text(json.dumps({"federation": {"robust": "median", "trim_fraction": 0.2}}))
    assert load_job_config(fl_ctx).federation.trim_fraction == 0.2  # control: a valid config loads
    overrides = tmp_path / "site.json"
    overrides.write_text(json.dumps({"federation.trim_fraction": 0.7}))
    monkeypatch.setenv("FUSS_SITE_CONFIG", str(overrides))
    with pytest.raises(ConfigError, match=r"federation\.trim_fraction"):
        load_site_config(fl_ctx)


# ---------------------------------------------------------------------------------------------- job generator


def _job_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _class_paths(config) -> list[str]:
    """Every ``path`` (a class FLARE builds) in a job config, however nested."""
    if isinstance(config, dict):
        own = [config["path"]] if isinstance(config.get("path"), str) else []
        return own + [p for value in config.values() for p in _class_paths(value)]
    if isinstance(config, list):
        return [p for value in config for p in _class_paths(value)]
    return []


def test_committed_jobs_are_what_the_generator_writes(tmp_path):
    export_committed(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"fuss_{p}" for p in COMMITTED)
    for preset in COMMITTED:
        committed, fresh = REPO / "jobs" / f"fuss_{preset}", tmp_path / f"fuss_{preset}"
        assert _job_files(committed) == _job_files(fresh), preset
        for rel in _job_files(fresh):
            assert (committed / rel).read_bytes() == (fresh / rel).read_bytes(), \
                f"jobs/fuss_{preset}/{rel} is stale: regenerate with `python -m fuss_flare.job committed`"


DEPLOY = {
    "camvid": ["0001TP", "0006R0", "site-0016E5", "Seq05VD"],
    "cityscapes": ["client1", "client2", "client3", "val"],
    "polyp": ["kvasir", "cvc_clinicdb"],
    "cocostuff27": [f"client{i}" for i in range(1, 19)] + ["val"],
}
TRAINING_SITES = {"camvid": 3, "cityscapes": 3, "polyp": 2, "cocostuff27": 18}


def test_committed_jobs_carry_configuration_only():
    # one committed job per dataset (its own preset); label-skewed variants are exported on demand
    assert sorted(COMMITTED) == sorted(DEPLOY) == sorted(n for n, p in PRESETS.items() if n == p.dataset)
    assert not [str(p) for p in (REPO / "jobs").rglob("custom")]  # a custom/ folder would make a job BYOC
    assert not [str(p) for p in (REPO / "jobs").rglob("*.py")]
    for preset in COMMITTED:
        assert _job_files(REPO / "jobs" / f"fuss_{preset}") == [
            "app/config/config_fed_client.json", "app/config/config_fed_server.json", f"app/config/{CONFIG_FILE}",
            "meta.json"]


@pytest.mark.parametrize("preset", COMMITTED)
def test_committed_job_contents(preset):
    from fuss_flare.site_policy import CLASS_ALLOW_LIST

    job = REPO / "jobs" / f"fuss_{preset}"
    cfg = FussConfig.load(job / "app" / "config" / CONFIG_FILE)
    assert cfg.train.num_clusters == PRESETS[preset].num_clusters and cfg.partition == preset
    assert cfg.federation.rounds == 10 and cfg.federation.local_epochs == 1.0 and cfg.federation.local_steps is None
    assert cfg.data.root is None and cfg.cache_dir is None  # resolved on each site
    meta = _read_json(job / "meta.json")
    assert meta["deploy_map"] == {"app": ["server", *DEPLOY[preset]]}
    assert meta["min_clients"] == TRAINING_SITES[preset] and "scope" not in meta
    server = _read_json(job / "app" / "config" / "config_fed_server.json")
    client = _read_json(job / "app" / "config" / "config_fed_client.json")
    (workflow,) = server["workflows"]
    assert workflow["path"] == "fuss_flare.controller.FussController"
    # every round waits for every site; the census needs every training site
    assert workflow["args"] == {"min_clients": len(DEPLOY[preset]), "min_training_sites": TRAINING_SITES[preset]}
    assert {c["id"]: c["path"] for c in server["components"]} == {
        "aggregator": "fuss_flare.aggregator.FussAggregator",
        "persistor": "fuss_flare.persistor.FussModelPersistor",
        "shareable_generator":
            "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
        "recorder": "fuss_flare.recorder.FussRecorder",
        "tb_receiver": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
    }
    assert server["server"] == {"task_request_interval": 0.2}
    (executor,) = client["executors"]
    assert executor["tasks"] == sorted(ALL_TASKS)
    assert executor["executor"] == {"path": "fuss_flare.executor.FussExecutor", "args": {}}
    assert [c["path"] for c in client["components"]] == ["fuss_flare.filters.FussAnalyticsForwarder"]
    (chain,) = client["task_result_filters"]
    assert chain["tasks"] == sorted(ALL_TASKS)
    assert [f["path"] for f in chain["filters"]] == ["fuss_flare.filters.FussResultFilter"]
    # a site whose class_allow_list is fuss_flare.site_policy's builds every class of the job
    paths = _class_paths(server) + _class_paths(client)
    assert len(paths) == 9 and set(paths) <= set(CLASS_ALLOW_LIST)


def test_every_allowed_class_exists():
    from fuss_flare.site_policy import CLASS_ALLOW_LIST

    assert len(set(CLASS_ALLOW_LIST)) == len(CLASS_ALLOW_LIST)
    # FLARE's own forwarder would let a job send analytics around FussAnalyticsForwarder's policy
    assert "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent" not in CLASS_ALLOW_LIST
    for path in CLASS_ALLOW_LIST:
        module, _, name = path.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name, None)), path


def test_committed_simulator_workspace_policy_is_what_site_policy_writes(tmp_path):
    from fuss_flare.site_policy import CLASS_ALLOW_LIST, HOSPITAL_AUTHORIZATION, install, main as policy_main

    local_ws = tmp_path / "ws" / "local"
    assert install(tmp_path / "ws") == [local_ws / "resources.json", local_ws / "fuss_policy.json"]
    for name in ("resources.json", "fuss_policy.json"):
        assert (REPO / "simulator_workspace" / "local" / name).read_bytes() == (local_ws / name).read_bytes(), \
            "regenerate with `python -m fuss_flare.site_policy simulator_workspace`"
    committed = REPO / "simulator_workspace" / "local" / "resources.json"
    # a site's own disclosure bounds survive a re-install
    (local_ws / "fuss_policy.json").write_text(json.dumps({"max_clusters": 12}))
    assert install(tmp_path / "ws") == [local_ws / "resources.json"]
    assert _read_json(local_ws / "fuss_policy.json") == {"max_clusters": 12}
    assert _read_json(committed) == {"class_allow_list": CLASS_ALLOW_LIST, "class_list_enforcement_mode": "enforce"}
    # a provisioned kit: its own settings kept, custom code refused to every role, logs stay on the site
    local = tmp_path / "kit" / "local"
    local.mkdir(parents=True)
    kit_defaults = {"format_version": 2, "class_list_enforcement_mode": "warn"}
    (local / "resources.json.default").write_text(json.dumps(kit_defaults))
    assert policy_main([str(tmp_path / "kit"), "--no-byoc"]) == 0
    resources = _read_json(local / "resources.json")
    assert resources == {"format_version": 2, "class_list_enforcement_mode": "enforce",
                         "class_allow_list": CLASS_ALLOW_LIST, "allow_log_streaming": False}
    policy = _read_json(local / "authorization.json")
    assert policy == HOSPITAL_AUTHORIZATION
    assert {role: rights.get("byoc", "none") for role, rights in policy["permissions"].items()} == {
        "project_admin": "none", "org_admin": "none", "lead": "none", "member": "none"}
    # ... and its data, partition, cache and weights keys are its own (a job's values never replace them)
    from fuss_components.disclosure import SITE_OWNED_KEYS

    assert _read_json(local / "fuss_policy.json")["site_owned"] == list(SITE_OWNED_KEYS)
    assert _read_json(local_ws / "fuss_policy.json").get("site_owned", []) == []  # not the simulator's


def test_site_policy_hands_a_sites_gpus_to_flare_and_keeps_the_kits_other_components(tmp_path):
    from fuss_flare.site_policy import GPU_RESOURCE_CONSUMER, GPU_RESOURCE_MANAGER, install, main as policy_main

    local = tmp_path / "kit" / "local"
    local.mkdir(parents=True)
    launcher = {"id": "process_launcher", "path": "nvflare.app_common.job_launcher.client_process_launcher."
                                                  "ClientProcessJobLauncher", "args": {}}
    kit_manager = {"id": "resource_manager", "path": GPU_RESOURCE_MANAGER,
                   "args": {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0}}
    (local / "resources.json.default").write_text(json.dumps({"components": [kit_manager, launcher]}))
    install(tmp_path / "kit", gpus=(2, 39.49))
    components = {c["id"]: c for c in _read_json(local / "resources.json")["components"]}
    assert components["resource_manager"] == {"id": "resource_manager", "path": GPU_RESOURCE_MANAGER, "args": {
        "num_of_gpus": 2, "mem_per_gpu_in_GiB": 39.5, "expiration_period": 300}}
    assert components["resource_consumer"]["path"] == GPU_RESOURCE_CONSUMER
    assert components["process_launcher"] == launcher and len(components) == 3  # replaced, not added twice
    assert policy_main([str(tmp_path / "kit"), "--gpus", "1", "--gpu-memory", "16"]) == 0
    manager = {c["id"]: c for c in _read_json(local / "resources.json")["components"]}["resource_manager"]
    assert (manager["args"]["num_of_gpus"], manager["args"]["mem_per_gpu_in_GiB"]) == (1, 16.0)
    # a site without GPUs (this machine, or --gpus 0) keeps what its kit configures
    cpu_site = tmp_path / "cpu" / "local"
    cpu_site.mkdir(parents=True)
    (cpu_site / "resources.json.default").write_text(json.dumps({"components": [kit_manager, launcher]}))
    assert policy_main([str(tmp_path / "cpu"), "--gpus", "0"]) == 0
    assert _read_json(cpu_site / "resources.json")["components"] == [kit_manager, launcher]


def test_export_asks_each_named_site_for_a_gpu_through_flares_resource_spec(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["export", "--preset", "camvid", "--set", "federation.site_gpu_memory_gb=12",
                 "--out", str(out)]) == 0
    meta = _read_json(out / "fuss_camvid" / "meta.json")
    assert meta["resource_spec"] == {site: {"num_of_gpus": 1, "mem_per_gpu_in_GiB": 12.0}
                                     for site in DEPLOY["camvid"]}
    assert _read_json(REPO / "jobs" / "fuss_camvid" / "meta.json")["resource_spec"] == {}  # the default asks none
    assert main(["export", "--preset", "camvid", "--set", "federation.site_gpu_memory_gb=12", "--deploy-all",
                 "--out", str(tmp_path / "all")]) != 0
    assert "--deploy-all" in capsys.readouterr().err


def test_export_command_line_variants(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["export", "--preset", "camvid", "--rounds", "3", "--local-steps", "20", "--aggregator",
                 "fedcc-maximin", "--fedprox-mu", "0.001", "--moon-weight", "1.0", "--moon-tau", "0.2",
                 "--unweighted", "--no-average-head", "--min-clients", "2", "--set", "train.lr_head=0.001",
                 "--record-updates", "--server-param", "dead_client_grace_period=0",
                 "--out", str(out), "--name", "camvid_variant"]) == 0
    job = out / "camvid_variant"
    assert f"nvflare simulator {job} -t 4\n" in capsys.readouterr().out
    assert not (job / "app" / "custom").exists()
    cfg = FussConfig.load(job / "app" / "config" / CONFIG_FILE)
    f, t = cfg.federation, cfg.train
    assert (f.rounds, f.local_steps, f.aggregator, f.weighted, f.average_head, f.aggregate_centroids,
            f.min_clients) == (3, 20, "fedcc-maximin", False, False, True, 2)
    assert (t.fedprox_mu, t.moon_weight, t.moon_tau, t.lr_head, t.num_clusters) == (0.001, 1.0, 0.2, 0.001, 11)
    server = _read_json(job / "app" / "config" / "config_fed_server.json")
    assert server["workflows"][0]["args"] == {"min_clients": 4, "min_training_sites": 2, "num_rounds": 3}
    assert {c["id"]: c["args"] for c in server["components"]}["recorder"] == {"record_updates": True}
    assert server["dead_client_grace_period"] == 0
    meta = _read_json(job / "meta.json")
    assert meta["min_clients"] == 2 and meta["deploy_map"] == {"app": ["server", *DEPLOY["camvid"]]}

    assert main(["export", "--preset", "cityscapes", "--clients", "18", "--out", str(out)]) == 0
    job = out / "fuss_cityscapes_18clients"
    assert FussConfig.load(job / "app" / "config" / CONFIG_FILE).partition == "cityscapes:18"
    assert _read_json(job / "meta.json")["deploy_map"]["app"] == ["server"] + [f"client{i}" for i in range(1, 19)] + [
        "val"]
    assert _read_json(job / "app" / "config" / "config_fed_server.json")["workflows"][0]["args"]["min_clients"] == 19
    assert main(["export", "--preset", "cityscapes", "--clients", "5", "--out", str(out)]) == 2
    assert "--clients 5" in capsys.readouterr().err
    # unknown config key: rejected before anything is written
    assert main(["export", "--preset", "polyp", "--set", "train.nope=1", "--out", str(out)]) == 2
    assert "train.nope" in capsys.readouterr().err and not (out / "fuss_polyp").exists()


def test_export_deploy_all_and_from_a_config_file(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["export", "--preset", "camvid", "--deploy-all", "--out", str(out)]) == 0
    assert "-n <sites>" in capsys.readouterr().out  # the simulator then needs the site names
    assert _read_json(out / "fuss_camvid" / "meta.json")["deploy_map"] == {"app": ["@ALL"]}
    # the controller still waits for the partition's sites
    server = _read_json(out / "fuss_camvid" / "app" / "config" / "config_fed_server.json")
    assert server["workflows"][0]["args"] == {"min_clients": 4, "min_training_sites": 3}

    # a config whose partition is a manifest: its sites, under their FLARE names, the validation-only ones last
    manifest = tmp_path / "partition.json"
    manifest.write_text(json.dumps({"clients": {"0016E5": ["a"], "b": ["c"]}, "validation": {"b": ["d"], "v": ["e"]}}))
    config = tmp_path / "my_run.json"
    FussConfig.from_dict({"partition": str(manifest), "federation": {"rounds": 2}}).save(config)
    assert main(["export", "--config", str(config), "--out", str(out)]) == 0
    job = out / "my_run"
    assert FussConfig.load(job / "app" / "config" / CONFIG_FILE) == FussConfig.load(config)
    assert _read_json(job / "meta.json")["deploy_map"] == {"app": ["server", "site-0016E5", "b", "v"]}
    assert _read_json(job / "app" / "config" / "config_fed_server.json")["workflows"][0]["args"] == {
        "min_clients": 3, "min_training_sites": 2, "num_rounds": 2}


def test_export_resume_from_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "fuss_checkpoint.pt"
    torch.save({"round": 3, "model": model_state(1), "history": "{}"}, ckpt)
    out = tmp_path / "jobs"
    assert main(["export", "--preset", "polyp", "--rounds", "6", "--resume-from", str(ckpt), "--out", str(out)]) == 0
    server = _read_json(out / "fuss_polyp" / "app" / "config" / "config_fed_server.json")
    assert server["workflows"][0]["args"] == {"min_clients": 2, "min_training_sites": 2, "num_rounds": 2,
                                              "start_round": 4}  # rounds 4, 5
    args = {c["id"]: c["args"] for c in server["components"]}
    assert args["persistor"] == {"source_ckpt_file_full_name": str(ckpt)}
    assert args["recorder"] == {"resume_from": str(ckpt)}
    # nothing left to run: refused, naming the round the checkpoint holds
    assert main(["export", "--preset", "polyp", "--rounds", "4", "--resume-from", str(ckpt), "--out", str(out),
                 "--name", "done"]) == 2
    assert "already holds round 3" in capsys.readouterr().err and not (out / "done").exists()


def test_fuss_cli_delegates_job_export(tmp_path):
    from fuss_components.cli import main as fuss_main

    assert fuss_main(["job", "export", "--preset", "polyp", "--aggregator", "fedavg", "--out", str(tmp_path)]) == 0
    cfg = FussConfig.load(tmp_path / "fuss_polyp" / "app" / "config" / CONFIG_FILE)
    assert cfg.federation.aggregator == "fedavg" and cfg.train.num_clusters == 2
    assert _read_json(tmp_path / "fuss_polyp" / "meta.json")["deploy_map"] == {"app": ["server", *DEPLOY["polyp"]]}
