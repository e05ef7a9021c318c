"""Curvature methods register themselves and declare what they need: fitting runs the passes a method declares, and a
method defined in this file alone is fitted, saved, loaded, accepted by the settings, run configs and the memory plan,
and used by the index as far as its declarations allow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import Curvature, CurvatureSettings, EKFACCurvature, fit_curvature, registry
from concept_influence.curvature.base import map_shapes
from concept_influence.estimators import ConceptInfluence
from concept_influence.index import GradientIndex
from concept_influence.index.subspace import make_spaces
from concept_influence.plan import PlanError, PlanSettings
from probes import ConceptDirection

MINIMAL = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "probe": {"hook": "h", "direction": "d"}}


def _recording(examples, done: list):
    def accumulate(name, collect):
        done.append(name)
        return collect(examples)
    return accumulate


def test_the_registry_lists_each_method_with_its_passes():
    assert tuple(registry.STRATEGIES)[:3] == ("ekfac", "kfac", "identity") and "unrolled" in registry.STRATEGIES
    assert tuple(registry.FITTED) == ("ekfac", "kfac", "identity")
    assert tuple(registry.FITTED_FROM_DATA) == ("ekfac", "kfac")
    assert registry.passes("ekfac") == ("covariance", "eigenvalues") and registry.passes("unrolled") is None
    assert EKFACCurvature.has_eigenbasis and EKFACCurvature.has_damping
    with pytest.raises(ValueError, match="is already registered by EKFACCurvature"):
        type("Other", (Curvature,), {"strategies": {"kfac": ("covariance",)}})


@pytest.mark.parametrize("strategy", registry.FITTED)
def test_fitting_runs_exactly_the_passes_a_method_declares(tl_adapter, tokenized, strategy):
    done = []
    curvature = fit_curvature(tl_adapter, [], 0, strategy=strategy, accumulate=_recording(tokenized, done), progress=False)
    assert tuple(done) == registry.passes(strategy) and curvature.strategy == strategy


@pytest.fixture
def scaled_identity(monkeypatch):
    """A method defined here only: each map's gradient divided by the mean eigenvalue of its K-FAC factors."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # registered for this test alone

    class ScaledIdentity(Curvature):
        strategies = {"scaled_identity": ("covariance",)}

        def __init__(self, shapes, scales, fingerprint=None, n_examples=0):
            super().__init__("scaled_identity", shapes, None, fingerprint, n_examples)
            self.scales = scales

        @classmethod
        def fit(cls, strategy, fitting):
            factors, n_examples = fitting.kronecker_factors()
            return cls({m.name: m.shape for m in fitting.maps},
                       {name: 1 / float(f.eigenvalues.mean()) for name, f in factors.items()}, fitting.fingerprint,
                       n_examples)

        def _precondition_map(self, name, v):
            return v * self.scales[name]

        def _config(self):
            return {"scales": self.scales}

        @classmethod
        def _restore(cls, config, tensors):
            return cls(map_shapes(config), config["scales"], config["fingerprint"], config["n_examples"])

    return ScaledIdentity


def test_a_method_defined_outside_the_library_is_fitted_saved_and_loaded(scaled_identity, tl_adapter, tokenized, tmp_path):
    done = []
    curvature = fit_curvature(tl_adapter, [], 0, strategy="scaled_identity", accumulate=_recording(tokenized, done),
                              progress=False)
    assert done == ["covariance"] and isinstance(curvature, scaled_identity)
    kfac = fit_curvature(tl_adapter, tokenized, 0, strategy="kfac", progress=False)
    name = kfac.map_names[0]
    v = torch.randn(2, *kfac.shapes[name])
    torch.testing.assert_close(curvature.precondition({name: v})[name], v / kfac.factors[name].eigenvalues.mean())
    loaded = Curvature.load(curvature.save(tmp_path / "c"), tl_adapter)
    assert type(loaded) is scaled_identity and loaded.scales == curvature.scales


def test_settings_run_configs_and_plans_accept_a_registered_method(scaled_identity):
    assert CurvatureSettings(strategy="scaled_identity").strategy == "scaled_identity"
    with pytest.raises(ValueError, match="must be one of ekfac, kfac, identity, scaled_identity; got 'diagonal'"):
        CurvatureSettings(strategy="diagonal")
    config = RunConfig.from_dict({**MINIMAL, "factors": {"strategy": "scaled_identity"}}, "test.toml")
    assert config.factors.settings().strategy == "scaled_identity"
    with pytest.raises(ConfigError, match="'factors.strategy' must be one of ekfac, kfac, adam_state, scaled_identity; "
                                          "got 'identity'"):
        RunConfig.from_dict({**MINIMAL, "factors": {"strategy": "identity"}}, "test.toml")
    assert PlanSettings(strategy="scaled_identity").passes == ("covariance",)
    with pytest.raises(PlanError, match="strategy must be one of ekfac, kfac, scaled_identity"):
        PlanSettings(strategy="identity")


def test_the_index_uses_a_method_as_far_as_it_declares(scaled_identity, tl_adapter, tokenized, tmp_path):
    """No eigenbasis: the eigen and random projections are refused by name; the identity projection stores the
    curvature itself and scores exactly."""
    curvature = fit_curvature(tl_adapter, tokenized, strategy="scaled_identity", progress=False)
    maps = tl_adapter.linear_maps()
    with pytest.raises(ValueError, match=r"eigen projection needs a curvature method declaring has_eigenbasis \(ekfac, kfac"):
        make_spaces("eigen", 4, maps, curvature)
    with pytest.raises(ValueError, match="declaring has_eigenbasis and has_damping .*; scaled_identity does not"):
        make_spaces("random", 4, maps, curvature)
    index = GradientIndex.build(tmp_path / "i", tl_adapter, tokenized, curvature, projection="identity", dtype="float32",
                                progress=False)
    direction = ConceptDirection(torch.randn(tl_adapter.d_model, generator=torch.Generator().manual_seed(0)),
                                 "blocks.1.hook_resid_post", kind="custom")
    estimator = ConceptInfluence(ConceptFunction.from_directions(direction, tokenized[:3]), curvature)
    ref = estimator.score(tl_adapter, tokenized, batch_size=4, progress=False).values
    got = index.score(estimator, tl_adapter, progress=False).values
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
