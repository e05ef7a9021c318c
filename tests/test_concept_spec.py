"""One concept specification: each way to name a concept (directions, SAE latents, test examples) is built by
``build_concept`` to what the lower-level constructors give, a run config can name an SAE latent, and the command
line's options are the specification's fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder import make_project

from concept_influence import ConceptSpec, build_concept
from concept_influence.cli import build_parser
from concept_influence.concept_spec import CONCEPT_TYPES, query_estimator, steering_direction
from concept_influence.concepts import ConceptError, ConceptFunction
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import fit_curvature
from concept_influence.data import load_chats, tokenize_examples
from concept_influence.estimators import ConceptGradDot, ConceptInfluence, GradDot, InfluenceFunction
from concept_influence.models import load_model
from concept_influence.runs import run_config
from concept_influence.sae_concepts import latent_concept
from concept_influence.scores import Scores
from probes import ConceptDirection, load_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("spec"), n_train=40)
    from sae_lens import SAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=32, d_sae=8).to_dict())
    sae.cfg.metadata.hook_name = HOOK
    sae.save_model(root / "sae")
    for i in range(2):
        ConceptDirection(torch.randn(32, generator=torch.Generator().manual_seed(i)), HOOK).save(root / f"d{i}.safetensors")
    return root


def _read(adapter):
    return lambda path, limit: tokenize_examples(load_chats(path, limit), adapter.tokenizer, 128, skip_truncated=True)


def test_a_spec_names_exactly_one_registered_type():
    assert ConceptSpec(directions=["a"]).type == "direction"
    assert ConceptSpec(sae="s", latents=[1, 2]).type == "sae_latent"
    assert ConceptSpec(test="t.jsonl").type == "test_examples"
    with pytest.raises(ConceptError, match="exactly one way .* got none"):
        ConceptSpec(sae="s").type  # latents missing
    with pytest.raises(ConceptError, match="got direction and test_examples"):
        ConceptSpec(directions=["a"], test="t").type
    with pytest.raises(ValueError, match="latents must be a non-empty list of int"):
        ConceptSpec(sae="s", latents=["1"])
    fields = {f.name for f in dataclasses.fields(ConceptSpec)}
    assert all(set(t.needs) <= fields for t in CONCEPT_TYPES.values())


def test_each_type_builds_what_its_constructor_builds(project):
    adapter = load_model(project / "model")
    read = _read(adapter)
    evals = read(str(project / "pos.jsonl"), 8)
    paths = [str(project / f"d{i}.safetensors") for i in range(2)]
    built = build_concept(ConceptSpec(directions=paths, eval=str(project / "pos.jsonl"), max_examples=8), adapter, read)
    direct = ConceptFunction.from_directions([ConceptDirection.load(p) for p in paths], evals)
    assert built.k == 2 and torch.equal(built.evaluate(adapter), direct.evaluate(adapter))

    spec = ConceptSpec(sae=str(project / "sae"), latents=[1, 5], sae_kind="decoder", eval=str(project / "pos.jsonl"),
                       max_examples=8)
    direct = latent_concept(load_sae(project / "sae"), [1, 5], evals, kind="decoder", reduction="last_prompt")
    assert torch.equal(build_concept(spec, adapter, read).evaluate(adapter), direct.evaluate(adapter))
    assert torch.equal(steering_direction(spec, adapter).vector, load_sae(project / "sae").W_dec[1].detach())

    test = ConceptSpec(test=str(project / "neg.jsonl"), max_examples=4)
    assert isinstance(query_estimator(test, adapter, read), InfluenceFunction)
    assert type(query_estimator(test, adapter, read, preconditioned=False)) is GradDot
    assert isinstance(query_estimator(spec, adapter, read), ConceptInfluence)
    assert type(query_estimator(spec, adapter, read, preconditioned=False)) is ConceptGradDot
    with pytest.raises(ConceptError, match="no direction to steer along"):
        steering_direction(test, adapter)
    with pytest.raises(ConceptError, match="at hook 'blocks.0.hook_resid_post', but the concept's hook is"):
        build_concept(ConceptSpec(directions=paths, hook="blocks.1.hook_resid_post", eval=spec.eval), adapter, read)


SAE_RUN = """
[model]
path = "model"

[data]
train = "train.jsonl"
max_length = 128

[concept]
sae = "sae"
latents = [1, 5]
hook = "blocks.0.hook_resid_post"
eval = "pos.jsonl"
max_examples = 16
check_positive = "pos.jsonl"
check_negative = "neg.jsonl"
check_max_examples = 8

[factors]
shard_size = 16

[scoring]
shard_size = 16
"""


def test_a_run_config_scores_sae_latents_as_the_api_does(project):
    """A run whose concept is two SAE latents (no [probe]) gives the scores of the API's ConceptInfluence on
    ``latent_concept``, and checks the concept along the first latent's decoder row."""
    torch.set_num_threads(1)
    (project / "sae_run.toml").write_text(SAE_RUN)
    config = RunConfig.read(project / "sae_run.toml")
    report = run_config(config, project / "runs" / "sae", progress=False)
    adapter = load_model(project / "model")
    read = _read(adapter)
    train = read(str(project / "train.jsonl"), None)
    concept = latent_concept(load_sae(project / "sae"), [1, 5], read(str(project / "pos.jsonl"), 16),
                             reduction="last_prompt")
    curvature = fit_curvature(adapter, train, maps=adapter.linear_maps(max_block=0), progress=False)
    expected = ConceptInfluence(concept, curvature).score(adapter, train, progress=False)
    got = Scores.load(project / "runs" / "sae" / "scores" / "scores.safetensors")
    assert got.ids == expected.ids and got.columns == ["sae_latent_1", "sae_latent_5"]
    err = np.abs(got.values - expected.values).max() / np.abs(expected.values).max()
    assert err < 1e-5, err
    assert "concept: sae_latent at `blocks.0.hook_resid_post`" in report.read_text()
    assert (project / "runs" / "sae" / "check" / "concept_check.json").is_file()
    assert not (project / "runs" / "sae" / "probe").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('hook = "blocks.0.hook_resid_post"\n', ""), "name the concept: a [probe] section"),
    (lambda t: t.replace("[concept]\n", '[probe]\nhook = "h"\ndirection = "d.safetensors"\n\n[concept]\n'),
     "the concept is named twice: by [probe] and by concept.sae"),
    (lambda t: t.replace("latents = [1, 5]", 'latents = ["1"]'), "'concept.latents' must be list or null"),
    (lambda t: t.replace("latents = [1, 5]", "latents = []"), "concept.latents must be a non-empty list of int"),
])
def test_a_badly_named_concept_is_a_config_error(project, edit, message):
    path = project / "bad.toml"
    path.write_text(edit(SAE_RUN))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunConfig.read(path)


def test_the_command_line_options_are_the_spec_fields():
    parser = build_parser()
    query = parser.parse_args(["index", "query", "IDX", "--out", "o", "--sae", "s", "--latents", "3", "17"])
    assert query.latents == [3, 17] and query.sae == "s" and not hasattr(query, "directions")
    check = parser.parse_args(["concept", "check", "--model", "m", "--directions", "d", "--positive", "p",
                               "--negative", "n"])
    assert check.directions == ["d"]
