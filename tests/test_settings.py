"""Settings dataclasses: one declaration per option for the API, the run config and the CLI help; the
estimator and reduction names each come from one registry; provenance is read in one place."""

from __future__ import annotations

import dataclasses

import pytest

from concept_influence.cli import main
from concept_influence.config import ConfigError, FactorsConfig, RunConfig, ScoringConfig, settings_help
from concept_influence.curvature import CurvatureSettings
from concept_influence.engine import ScoringSettings
from concept_influence.estimators import ESTIMATORS, RUN_ESTIMATORS
from concept_influence.provenance import PACKAGES, combine_digests, machine_description, package_versions
from probes import REDUCTIONS

MINIMAL = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "probe": {"hook": "h", "direction": "d"}}


def config(**sections) -> RunConfig:
    return RunConfig.from_dict({**MINIMAL, **sections}, "test.toml")


@pytest.mark.parametrize("cls", [CurvatureSettings, ScoringSettings, FactorsConfig, ScoringConfig])
def test_every_setting_has_help_text(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name


def test_settings_check_their_values_by_name():
    with pytest.raises(ValueError, match="'strategy' must be one of ekfac, kfac, identity; got 'diagonal'"):
        CurvatureSettings(strategy="diagonal")
    with pytest.raises(ValueError, match="damping must be a positive"):
        CurvatureSettings(damping=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ScoringSettings(batch_size=0)
    with pytest.raises(TypeError, match="has no setting dampnig"):
        CurvatureSettings().replace(dampnig=0.1)
    assert CurvatureSettings().replace(damping=0.5).damping == 0.5


def test_config_sections_are_the_settings_plus_run_keys():
    cfg = config(factors={"damping": 0.01, "shard_size": 4}, scoring={"batch_size": 2, "per_module": True})
    assert cfg.factors.settings() == CurvatureSettings(damping=0.01)
    assert cfg.scoring.settings() == ScoringSettings(batch_size=2, per_module=True)
    for section, settings in ((FactorsConfig, CurvatureSettings), (ScoringConfig, ScoringSettings)):
        assert {f.name for f in dataclasses.fields(settings)} <= {f.name for f in dataclasses.fields(section)}
    assert set(RunConfig.from_dict(cfg.to_dict()).to_dict()["factors"]) == {f.name for f in dataclasses.fields(FactorsConfig)}


@pytest.mark.parametrize("sections, message", [
    ({"factors": {"strategy": "identity"}}, "'factors.strategy' must be one of ekfac, kfac, adam_state; got 'identity'"),
    ({"factors": {"damping": 0}}, "factors.damping must be a positive"),
    ({"factors": {"batch_size": 0}}, "factors.batch_size must be >= 1, got 0"),
    ({"scoring": {"loss_tokens": "prompt"}}, "'scoring.loss_tokens' must be one of response, all; got 'prompt'"),
    ({"scoring": {"estimator": "grad_dot"}}, "'scoring.estimator' must be one of " + ", ".join(RUN_ESTIMATORS)),
    ({"concept": {"reduction": "max"}}, "'concept.reduction' must be one of " + ", ".join(REDUCTIONS)),
])
def test_config_checks_settings_by_key(sections, message):
    with pytest.raises(ConfigError) as e:
        config(**sections)
    assert str(e.value).startswith("test.toml: ") and message in str(e.value)


def test_run_estimators_come_from_the_registry():
    assert RUN_ESTIMATORS == ("concept_influence", "concept_grad_dot", "probe_projection")
    assert all(ESTIMATORS[name].run_inputs for name in RUN_ESTIMATORS)
    assert "curvature" in ESTIMATORS["concept_influence"].run_inputs
    assert "curvature" not in ESTIMATORS["concept_grad_dot"].run_inputs


def test_cli_help_lists_every_setting(capsys):
    lines = settings_help()
    keys = [f"factors.{f.name}" for f in dataclasses.fields(FactorsConfig)] + \
           [f"scoring.{f.name}" for f in dataclasses.fields(ScoringConfig)]
    assert [line.split(" = ")[0] for line in lines] == keys
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(CurvatureSettings):
        assert f"factors.{f.name} = " in text and " ".join(f.metadata["help"].split()) in text


def test_provenance_is_read_in_one_place():
    import torch

    versions = package_versions()
    assert versions["torch"] == torch.__version__ and set(PACKAGES) < set(versions) and "python" in versions
    machine = machine_description()
    assert machine["torch"] == torch.__version__ and machine["python"] == versions["python"]
    assert len(combine_digests(["ab", "cd"])) == 64 and combine_digests(["ab", "cd"]) != combine_digests(["cd", "ab"])
