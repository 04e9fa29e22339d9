"""The configured training device is honoured everywhere, shown without a GPU: a round on PyTorch's ``meta``
device (tensors without data) fails at the first operation that mixes a tensor left on the host into the
device's math ("Tensor on device cpu is not on the expected device meta"). Only what needs values is stood in
for: the calibrated shifts, PriMaPs' mask proposals (a once-per-view cache) and the round's one copy back to the
host (state and metrics), which are computed by the same trainer on the CPU."""

import pytest
import torch

import fuss_components.trainer as trainer_mod
from fuss_components.disclosure import Release
from fuss_components.evaluate import predict_logits
from fuss_components.head import FussModel
from fuss_components.site import Site, init_global_state, resolve_partition

OBJECTIVE_SETTINGS = {"stego": {}, "smooseg": {"train.num_random": 5, "loss.grid": 11, "train.knn": 7},
                      "primaps": {"train.num_random": 5, "loss.grid": 11, "train.knn": 7},
                      "ppap": {"train.num_random": 5, "loss.grid": 11, "train.knn": 7}}


def test_mixing_a_host_tensor_into_meta_math_raises():
    """The premise of this file's tests."""
    with pytest.raises(RuntimeError, match="not on the expected device meta"):
        torch.ones(3, device="meta") + torch.ones(3)


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_SETTINGS))
def test_a_training_round_on_the_configured_device_never_mixes_in_host_tensors(tiny_cfg, objective, monkeypatch):
    cfg = tiny_cfg.with_overrides({"train.objective": objective, **OBJECTIVE_SETTINGS[objective]})
    site = Site(cfg, "s1", resolve_partition(cfg))
    state = init_global_state(cfg)
    host = site.trainer
    host.train(state, 0)  # the values the meta round cannot compute
    device = trainer_mod.LocalTrainer(host.feats, cfg.with_overrides({"train.device": "meta"}), "s1",
                                      site.num_clusters, site.policy)
    assert device.device == torch.device("meta")
    device.shifts, device.mask_proposals = host.shifts, dict(host.mask_proposals)
    copies = []
    monkeypatch.setattr(device, "release_centroids", lambda model, received, seed: Release([], [], []))
    monkeypatch.setattr(device, "clusters_used", lambda model: 0)
    monkeypatch.setattr(trainer_mod, "to_host",
                        lambda t: copies.append(t.device) or torch.zeros(t.shape, dtype=t.dtype))
    result = device.train(state, 0)
    assert result.metrics["steps"] == cfg.federation.local_steps
    # everything the round copied back (its state and metrics, once) was on the device
    assert copies and set(copies) == {torch.device("meta")}
    assert len(copies) == len(state) + len([k for k in result.metrics if k.startswith(("loss", "ppap", "pseudo"))])


def test_evaluation_computes_on_the_models_device(tiny_cfg):
    with torch.device("meta"):
        model = FussModel(32, 8, 3, 0.0)
    feats = torch.randn(32, 3, 4)  # cached features come from the host
    logits = predict_logits(model.eval(), feats, (40, 56), mirror=feats)
    assert logits.device == torch.device("meta") and logits.shape == (3, 40, 56)
