"""SAE concepts end to end: training an SAE with SAE-Lens, finding a behaviour's latents, a latent as the concept
(through the estimators and the engine), explaining the top of a ranking with latents, the CLI, and the planted
benchmark's SAE stage. Every SAE entry point is checked for clear errors on a mismatched SAE."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from concept_influence.concepts import ConceptError, ConceptFunction
from concept_influence.data import collate, tokenize_examples, write_chat_jsonl
from concept_influence.estimators import ConceptGradDot, ProbeProjection
from concept_influence.explain import aggregate_by_latent, characteristic_latents, explain_top
from concept_influence.models import HFCausalLMAdapter, HookError, save_model
from concept_influence.sae_concepts import (
    describe_latents,
    latent_activations,
    latent_concept,
    rank_latents,
    top_activating_examples,
)
from concept_influence.sae_training import train_sae
from concept_influence.scores import Scores
from concept_influence.toy.small_model import build_small_model
from conftest import _hf_model, make_chats
from probes import ConceptDirection, SAEError, load_sae
from probes.sae_latents import auroc_columns, latent_separation
from probes.sae_training import sae_reconstruction_metrics

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)


@pytest.fixture(scope="module")
def data(tokenizer):
    return tokenize_examples(make_chats(60, seed=1), tokenizer, max_length=64)


@pytest.fixture(scope="module")
def trained(model, data, tmp_path_factory):
    return train_sae(model, data, HOOK, 32, tmp_path_factory.mktemp("sae") / "topk", k=4, epochs=5, batch_size=32,
                     progress=False)


def _foreign_sae(d_in=48, hook=HOOK):
    from sae_lens import SAE, StandardSAEConfig

    sae = SAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=16).to_dict())
    sae.cfg.metadata.hook_name = hook
    return sae


def _latent_per_token(sae, model, example, latent=None, hook=HOOK):
    acts = model.activations(collate([example], model.pad_token_id), hook)
    z = sae.encode(acts.float())[0, example.response_start:]
    return z if latent is None else z[:, latent]


# ---- training ---------------------------------------------------------------------------------------------------


def test_train_sae_round_trips_through_sae_lens(trained, model, data):
    from sae_lens import SAE

    assert (trained.path / "cfg.json").is_file() and (trained.path / "sae_weights.safetensors").is_file()
    back = SAE.load_from_disk(trained.path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(trained.sae, name)), name
    assert back.cfg.architecture() == "topk" and back.cfg.d_in == 32 and back.cfg.d_sae == 32
    assert back.cfg.metadata.hook_name == HOOK and load_sae(trained.path).cfg.metadata.loaded_from == str(trained.path)
    m = json.loads((trained.path / "training.json").read_text())
    assert m == pytest.approx(trained.metrics) and m["hook_name"] == HOOK and m["l0"] == pytest.approx(4.0)
    assert m["train_tokens"] + m["held_out_tokens"] == sum(len(e.input_ids) for e in data)
    # exactly k latents per token after saving (TopK kept as TopK), and the reconstruction metric is what it says
    z = back.encode(model.activations(collate(data[:4], model.pad_token_id), HOOK).float())
    assert ((z > 0).sum(-1) == 4).all()
    x = torch.randn(50, 32)
    r = sae_reconstruction_metrics(back, x, batch_size=7)
    x_hat = back.decode(back.encode(x)).detach()
    expected = 1 - float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert r["explained_variance"] == pytest.approx(expected, rel=1e-5) and r["l0"] == pytest.approx(4.0)


def test_train_standard_sae_on_a_hugging_face_model(tokenizer, data):
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    result = train_sae(adapter, data[:20], "blocks.0.hook_resid_post", 16, architecture="standard", epochs=2,
                       batch_size=32, progress=False)
    assert result.path is None and result.sae.cfg.architecture() == "standard"
    assert result.sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post" and result.sae.cfg.d_in == 32
    assert np.isfinite(result.metrics["explained_variance"])


def test_train_sae_bad_input(model, data):
    with pytest.raises(HookError, match="close matches: blocks.1.hook_resid_post"):
        train_sae(model, data, "blocks.1.hook_resid_pst", 16, progress=False)
    with pytest.raises(SAEError, match=r"k \(active latents per token\) must be in 1..d_sae=16, got 20"):
        train_sae(model, data, HOOK, 16, k=20, progress=False)
    with pytest.raises(SAEError, match="architecture must be one of"):
        train_sae(model, data, HOOK, 16, architecture="gated", progress=False)
    with pytest.raises(SAEError, match="fewer than one batch of 100000"):
        train_sae(model, data[:4], HOOK, 16, batch_size=100000, progress=False)


# ---- latents of a behaviour -------------------------------------------------------------------------------------


def test_latent_activations_match_a_direct_computation(trained, model, data):
    sae = trained.sae
    acts = latent_activations(sae, model, data[:7], batch_size=3)
    for i, e in enumerate(data[:7]):
        z = _latent_per_token(sae, model, e)
        np.testing.assert_allclose(acts.mean[i], z.mean(0).detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts.max[i], z.max(0).values.detach().numpy(), rtol=1e-5, atol=1e-6)
        fired = acts.max[i] > 0
        np.testing.assert_array_equal(acts.argmax[i][fired] - e.response_start,
                                      z.argmax(0).numpy()[fired])
    some = latent_activations(sae, model, data[:7], latents=[5, 2])
    np.testing.assert_allclose(some.mean, acts.mean[:, [5, 2]], rtol=1e-6)


def test_auroc_columns_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 4, (30, 6)).astype(float), rng.integers(0, 3, (25, 6)).astype(float)
    pos[:, 5] = neg[:, 5] = 0.0  # a dead latent: AUROC 0.5
    expected = [roc_auc_score([1] * 30 + [0] * 25, np.r_[pos[:, j], neg[:, j]]) for j in range(6)]
    np.testing.assert_allclose(auroc_columns(pos, neg), expected, rtol=1e-12)


def test_rank_latents_columns_and_order(trained, model, data):
    sae = trained.sae
    pos, neg = data[:20], data[20:40]
    probe = ConceptDirection(torch.randn(32, generator=torch.Generator().manual_seed(0)), HOOK)
    ranking = rank_latents(sae, model, pos, neg, probe)
    a_pos, a_neg = (latent_activations(sae, model, x) for x in (pos, neg))
    np.testing.assert_allclose(ranking.columns["diff"], a_pos.mean.mean(0) - a_neg.mean.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ranking.columns["freq_pos"], (a_pos.max > 0).mean(0))
    j = 7
    auc = roc_auc_score([1] * 20 + [0] * 20, np.r_[a_pos.mean[:, j], a_neg.mean[:, j]])
    assert ranking.columns["auroc"][j] == pytest.approx(auc)
    w = sae.W_dec[j].detach().double()
    assert ranking.columns["cos_decoder"][j] == pytest.approx(float(w @ probe.unit.double() / w.norm()))
    aurocs = [ranking.row(l)["auroc"] for l in ranking.top(32)]
    assert aurocs == sorted(aurocs, reverse=True)
    by_cos = latent_separation(a_pos, a_neg, sae, probe, sort_by="cos_decoder")
    assert by_cos.top(1) == [int(np.argmax(by_cos.columns["cos_decoder"]))]
    assert "| 1 | " in ranking.to_markdown(5) and len(ranking.to_markdown(5).splitlines()) == 7
    with pytest.raises(ValueError, match="needs a probe"):
        latent_separation(a_pos, a_neg, sort_by="cos_encoder")
    with pytest.raises(SAEError, match="probe is at 'blocks.0.hook_resid_post' but the SAE reads"):
        latent_separation(a_pos, a_neg, sae, ConceptDirection(torch.ones(32), "blocks.0.hook_resid_post"))


def test_top_activating_examples_and_labels(trained, model, data, tokenizer):
    acts = latent_activations(trained.sae, model, data)
    latent = int(np.argmax((acts.max > 0).sum(0)))
    top = top_activating_examples(acts, data, tokenizer, latent, k=4)
    assert len(top) == 4 and [t["max"] for t in top] == sorted(acts.max[:, latent], reverse=True)[:4]
    first = data[[e.id for e in data].index(top[0]["id"])]
    z = _latent_per_token(trained.sae, model, first, latent)
    assert top[0]["max"] == pytest.approx(float(z.max().detach()), rel=1e-5)
    assert top[0]["token"] == tokenizer.decode([first.input_ids[first.response_start + int(z.argmax())]])
    assert f"⟦{top[0]['token']}⟧".replace(" ", "") in top[0]["snippet"].replace(" ", "")
    labels = describe_latents(acts, data, tokenizer, [latent])
    assert repr(top[0]["token"].strip() or top[0]["token"]) in labels[latent].split(", ") or labels[latent]
    with pytest.raises(ValueError, match="do not match"):
        top_activating_examples(acts, data[::-1], tokenizer, latent)


# ---- a latent as the concept ------------------------------------------------------------------------------------


def test_latent_concept_fast_path_equals_its_definition(trained, model, data):
    sae = trained.sae
    latent = int(np.argmax(latent_activations(sae, model, data[:10]).mean.mean(0)))
    act = ProbeProjection(latent_concept(sae, latent, adapter=model)).score(model, data[:6], progress=False)
    for i, e in enumerate(data[:6]):
        assert act.values[i, 0] == pytest.approx(float(_latent_per_token(sae, model, e, latent).mean().detach()), rel=1e-5)
    dec = ProbeProjection(latent_concept(sae, [latent], kind="decoder")).score(model, data[:6], progress=False)
    unit = sae.W_dec[latent].detach() / sae.W_dec[latent].detach().norm()
    for i, e in enumerate(data[:6]):
        h = model.activations(collate([e], model.pad_token_id), HOOK)[0, e.response_start:]
        assert dec.values[i, 0] == pytest.approx(float((h @ unit).mean().detach()), rel=1e-4, abs=1e-6)
    assert dec.columns == [f"sae_decoder_{latent}"] and act.columns == [f"sae_latent_{latent}"]


def test_trained_topk_latent_concept_gradient_matches_autograd(trained, model, data):
    """Concept gradient-dot with f = a TopK latent's activation, through the engine, vs explicit autograd."""
    sae, evals, train = trained.sae, data[:3], data[3:6]
    latent = int(np.argmax(latent_activations(sae, model, evals).mean.mean(0)))
    scores = ConceptGradDot(latent_concept(sae, latent, evals, adapter=model)).score(model, train, progress=False)
    weights = [m.weight for m in model.linear_maps(max_block=1)]
    f = sum(_latent_per_token(sae, model, e, latent).mean() for e in evals) / len(evals)
    assert float(f.detach()) > 0
    gf = torch.autograd.grad(f, weights)
    for n, e in enumerate(train):
        gz = torch.autograd.grad(model.per_example_loss(collate([e], model.pad_token_id)).sum(), weights)
        expected = -sum(float((a * b).sum()) for a, b in zip(gf, gz))
        assert scores.values[n, 0] == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_mismatched_sae_is_refused_everywhere(model, data, trained):
    foreign = _foreign_sae(d_in=48)
    msg = "SAE d_in is 48 but the model's activations at 'blocks.1.hook_resid_post' have width 32"
    with pytest.raises(SAEError, match=msg):
        latent_concept(foreign, 0, data[:2], adapter=model)
    with pytest.raises(SAEError, match=msg):
        latent_activations(foreign, model, data[:2])
    with pytest.raises(SAEError, match=msg):
        rank_latents(foreign, model, data[:2], data[2:4])
    scores = Scores([e.id for e in data], np.arange(len(data), dtype=float), "x")
    with pytest.raises(SAEError, match=msg):
        explain_top(scores, foreign, model, data, 5)
    # built without the adapter
    with pytest.raises(ConceptError, match="reads width 48, the model's activations there have width 32"):
        ProbeProjection(ConceptFunction.from_sae_latents(foreign, [0])).score(model, data[:2], progress=False)
    wrong_hook = _foreign_sae(d_in=32, hook="blocks.5.hook_resid_post")
    with pytest.raises(HookError, match="layer 5 .* out of range"):
        latent_activations(wrong_hook, model, data[:2])
    with pytest.raises(HookError, match="layer 5 .* out of range"):
        ProbeProjection(latent_concept(wrong_hook, 0)).score(model, data[:2], progress=False)
    for bad in (32, -1):
        with pytest.raises(SAEError, match=rf"latent {bad} is out of range: the SAE has latents 0..31"):
            latent_concept(trained.sae, bad)
    with pytest.raises(SAEError, match="latent 40 is out of range"):
        latent_activations(trained.sae, model, data[:2], latents=[1, 40])
    with pytest.raises(ValueError, match="kind must be one of"):
        latent_concept(trained.sae, 0, kind="bias")


# ---- explaining the top of a ranking ----------------------------------------------------------------------------


def test_aggregation_splits_each_score_exactly():
    mean = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    scores = np.array([4.0, -1.5, 1.0])
    per_latent, unexplained = aggregate_by_latent(scores, mean)
    np.testing.assert_allclose(per_latent, [1.0 + 0.5, 3.0, 0.5])
    assert unexplained == -1.5 and per_latent.sum() + unexplained == pytest.approx(scores.sum())
    np.testing.assert_array_equal(characteristic_latents(mean, 1), [[0, 1, 0], [0, 0, 0], [1, 0, 0]])


def test_explain_top(trained, model, data, tmp_path):
    from concept_influence.plots import plot_latent_influence

    rng = np.random.default_rng(0)
    values = rng.normal(size=len(data))
    ids = [e.id for e in data]
    scores = Scores(ids[::-1], values[::-1], "toy")  # any order: scores are aligned to the examples by id
    e = explain_top(scores, trained.sae, model, data, 12, latents_per_example=3, n_clusters=3)
    top = np.argsort(-values)[:12]
    assert e.top_ids == [ids[i] for i in top]
    assert e.influence_top.sum() + e.unexplained_top == pytest.approx(values[top].sum())
    assert e.influence_all.sum() + e.unexplained_all == pytest.approx(values.sum())
    acts = latent_activations(trained.sae, model, data)
    carried = characteristic_latents(acts.mean, 3)
    np.testing.assert_array_equal(e.n_top, carried[top].sum(0))
    np.testing.assert_array_equal(e.n_all, carried.sum(0))
    j = e.elevated_latents(1)[0]
    assert e.row(j)["elevation"] == pytest.approx((acts.mean[top, j].mean() - acts.mean[:, j].mean()) / acts.mean[:, j].std(),
                                                  rel=1e-4)
    assert e.row(j)["elevation"] == pytest.approx(e.elevation.max())
    assert sorted(i for c in e.clusters for i in c.ids) == sorted(e.top_ids) and len(e.clusters) == 3
    assert [c.scores.sum() for c in e.clusters] == sorted((c.scores.sum() for c in e.clusters), reverse=True)
    for c in e.clusters:
        members = [ids.index(i) for i in c.ids]
        for latent, share in c.shared:
            assert share >= 0.5 and share == pytest.approx(carried[members, latent].mean())
    shared = e.shared_latents(5)
    assert [e.row(l)["n_top"] for l in shared] == sorted((e.row(l)["n_top"] for l in shared), reverse=True)
    assert e.row(shared[0])["n_top"] == e.n_top.max()
    assert e.influential_latents(1) == [int(np.argmax(e.influence_top))]
    md = e.to_markdown(5, texts={ids[top[0]]: "the top answer"})
    assert "the top answer" in md and "| cluster | size |" in md
    same = explain_top(scores, trained.sae, model, data, 12, latents_per_example=3, n_clusters=3, activations=acts)
    np.testing.assert_array_equal(same.influence_top, e.influence_top)
    shifted = Scores(ids, values - 10.0, "toy")  # an offset: centring removes it, the top-k stay the same
    c = explain_top(shifted, trained.sae, model, data, 12, activations=acts, center=True)
    assert c.top_ids == e.top_ids and c.offset == pytest.approx(values.mean() - 10.0)
    assert c.influence_top.sum() + c.unexplained_top == pytest.approx((values[top] - values.mean()).sum())
    assert c.influence_all.sum() + c.unexplained_all == pytest.approx(0.0, abs=1e-9)
    json.dumps(e.to_json())
    png = plot_latent_influence(e, tmp_path / "latents.png")
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError, match="k must be in 1..60"):
        explain_top(scores, trained.sae, model, data, 61, activations=acts)
    with pytest.raises(ValueError, match="collected on other examples"):
        explain_top(scores, trained.sae, model, data[:-1], 5, activations=acts)


# ---- command line -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_model(model, root / "model")
    pos, neg = make_chats(30, seed=2), make_chats(30, seed=3)
    paths = {name: write_chat_jsonl(x, root / f"{name}.jsonl") for name, x in
             (("train", make_chats(40, seed=4)), ("pos", pos), ("neg", neg))}
    return root, paths


def _run(argv):
    from concept_influence.cli import main

    return main([str(a) for a in argv])


def test_cli_sae_train_latents_explain(cli_setup, capsys):
    from sae_lens import SAE

    from concept_influence.data import load_chat_jsonl
    from concept_influence.models import load_model

    root, paths = cli_setup
    assert _run(["sae", "train", "--model", root / "model", "--data", paths["train"], "--hook", HOOK, "--d-sae", 24,
                 "--k", 3, "--epochs", 3, "--batch-size", 32, "--out", root / "sae", "--no-progress"]) == 0
    assert "held-out explained variance" in capsys.readouterr().out
    assert SAE.load_from_disk(root / "sae").cfg.d_sae == 24
    assert _run(["sae", "latents", "--model", root / "model", "--sae", root / "sae", "--positive", paths["pos"],
                 "--negative", paths["neg"], "--top", 5, "--latents", 0, 3, "--out", root / "latents",
                 "--no-progress"]) == 0
    saved = json.loads((root / "latents" / "latents.json").read_text())
    assert len(saved["ranking"]) == 24 and set(saved["top_examples"]) == {"0", "3"}
    assert "## Top activating examples" in (root / "latents" / "latents.md").read_text()
    adapter = load_model(root / "model")
    train = tokenize_examples(load_chat_jsonl(paths["train"]), adapter.tokenizer, 512)
    scores = Scores([e.id for e in train], -np.arange(len(train), dtype=float), "toy")
    scores.save(root / "scores.safetensors")
    assert _run(["sae", "explain", "--model", root / "model", "--sae", root / "sae", "--data", paths["train"],
                 "--scores", root / "scores.safetensors", "--top-k", 10, "--out", root / "explain", "--no-progress"]) == 0
    assert json.loads((root / "explain" / "explain.json").read_text())["top_ids"] == [e.id for e in train[:10]]
    assert (root / "explain" / "latent_influence.png").stat().st_size > 5000


def test_cli_sae_bad_input(cli_setup, capsys, tmp_path):
    root, paths = cli_setup
    base = ["sae", "latents", "--model", root / "model", "--positive", paths["pos"], "--negative", paths["neg"]]
    cases = {}
    cases["no such SAE folder"] = tmp_path / "nowhere"
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "cfg.json").write_text("{}")
    cases["missing sae_weights.safetensors"] = tmp_path / "no_weights"
    _foreign_sae(d_in=48).save_model(tmp_path / "wide")
    cases["SAE d_in is 48 but the model's activations at 'blocks.1.hook_resid_post' have width 32"] = tmp_path / "wide"
    _foreign_sae(d_in=32, hook="blocks.1.hook_resid_pst").save_model(tmp_path / "hook")
    cases["unknown hook name 'blocks.1.hook_resid_pst'"] = tmp_path / "hook"
    for message, sae in cases.items():
        assert _run(base + ["--sae", sae]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    _foreign_sae(d_in=32).save_model(tmp_path / "fits")
    assert _run(base + ["--sae", tmp_path / "fits", "--latents", 2, 99]) == 2
    assert "latent 99 is out of range: the SAE has latents 0..15" in capsys.readouterr().err
    assert _run(["sae", "train", "--model", root / "model", "--data", paths["train"], "--hook", "blocks.7.hook_resid_post",
                 "--d-sae", 32, "--out", tmp_path / "x"]) == 2
    assert "layer 7 in hook 'blocks.7.hook_resid_post' is out of range" in capsys.readouterr().err


def test_cli_help_documents_every_option():
    import argparse

    from concept_influence.cli import build_parser

    sae = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "sae")[1]
    commands = sae._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "latents", "explain"}
    for name, parser in commands.items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"sae {name} {action.option_strings} has no help"


# ---- the planted benchmark's SAE stage ----------------------------------------------------------------------------


def test_planted_benchmark_sae_stage(tmp_path):
    from concept_influence.demo import run_demo
    from concept_influence.planted import PlantedConfig
    from concept_influence.planted.sae_stage import SAE_ESTIMATORS

    cfg = PlantedConfig.quick(paired=True, n_probe=40, n_pretrain=80, n_pool=100, n_eval=12, vocab_size=400,
                              d_model=32, sae_latents=48, sae_k=4, sae_epochs=4, retrain=False)
    results = run_demo(tmp_path, cfg, progress=False)
    assert set(SAE_ESTIMATORS) <= results["estimators"].keys() and "behaviour" not in results
    s = results["sae"]
    assert load_sae(tmp_path / "sae").cfg.d_sae == 48
    assert s["best_latent"] == s["behaviour_latents"][0]["latent"]
    assert all(a["auroc"] >= b["auroc"] for a, b in zip(s["behaviour_latents"], s["behaviour_latents"][1:]))
    oracle = s["explain"]["planted (oracle)"]
    assert oracle["planted_in_top_k"] == results["splits"]["planted"]
    for name in SAE_ESTIMATORS:
        assert (tmp_path / "scores" / f"{name}.safetensors").is_file()
        assert 0 <= results["estimators"][name]["auroc"] <= 1
    report = (tmp_path / "results.md").read_text()
    assert "## SAE latents as the concept" in report and "--no-retrain" in report
    assert all((tmp_path / p).is_file() for p in s["plots"].values())
