"""The speed benchmark runs and reports finite positive figures (no timing assertions), and kronfluence and
Bergson agree with our Concept Influence on a tiny model when they are installed."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from norms import assert_close_in_norm
from scipy.stats import spearmanr

from concept_influence.concepts import ConceptFunction
from concept_influence.estimators import ConceptInfluence
from concept_influence.models import HFCausalLMAdapter
from concept_influence_benchmarks import bergson_concept_scores, kronfluence_concept_scores, run_speed_benchmark
from concept_influence_benchmarks.bergson_bridge import bergson_unavailable
from concept_influence_benchmarks.kronfluence_bridge import run_part_b
from concept_influence_benchmarks.speed import SpeedConfig, format_markdown
from concept_influence_benchmarks.speed_setup import prepare_speed_data
from conftest import _hf_model
from probes import ConceptDirection


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick speed benchmark without part B: its results and output folder."""
    out = tmp_path_factory.mktemp("speed")
    return run_speed_benchmark(out, quick=True, kronfluence=False), out


@pytest.mark.xdist_group("speed_quick_run")
def test_speed_benchmark_quick(quick_run):
    results, out = quick_run
    saved = json.loads((out / "speed.json").read_text())
    report = (out / "speed.md").read_text()
    assert saved["command"] == results["command"] and results["command"] in report
    assert "| probe_projection speed-up over full scoring" in report
    part_a = saved["part_a"]
    figures = list(part_a["ratios"].values()) + [part_a["query_gradient_seconds"]]
    for stage in part_a["stages"].values():
        figures += [stage["seconds_per_1k_examples"], stage["tokens_per_second"]]
    figures += [m[key] for m in saved["memory"].values() if m is not None for key in ("peak_mib", "increase_mib")]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    assert set(saved["memory"]) == set(part_a["stages"])
    assert "error" in saved["part_b"]  # kronfluence=False


def test_kronfluence_agrees(tmp_path, tokenizer, tokenized):
    pytest.importorskip("kronfluence")
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    gen = torch.Generator().manual_seed(0)
    directions = [ConceptDirection(torch.randn(adapter.d_model, generator=gen), "blocks.0.hook_resid_post")
                  for _ in range(2)]
    concept = ConceptFunction.from_directions(directions, eval_examples=tokenized[:4])
    ours = ConceptInfluence(concept, "ekfac").score(adapter, tokenized, batch_size=4, progress=False)
    kron = kronfluence_concept_scores(adapter, tokenized, concept, tmp_path / "kronfluence", batch_size=4,
                                      query_modes=("aggregated", "per_query"))
    for mode, scores in kron["scores"].items():  # the same numbers up to float rounding, sign included
        assert scores.shape == (len(tokenized), 2), mode
        for k in range(2):  # one scoring run per concept
            expected = ours.column(k)
            assert spearmanr(expected, scores[:, k]).statistic >= 0.9, (mode, k)
            assert_close_in_norm(scores[:, k], expected, 1e-4, msg=f"{mode}, concept {k}")  # ~5e-7 here


def test_size_benchmark_counts_flops_against_the_floor(tmp_path):
    """The size benchmark on the tiny shape: every stage reported, FLOP ratios that follow from the arithmetic (a
    training step is forward + full backward = 1.5 × forward + activation-only backward; the fast path stops early),
    low-rank scoring cheaper than full rank, kronfluence agreeing with ours for one and for several concepts, and the
    compared pipelines run once per round with their median reported (each stage's memory in its own process: the next
    test)."""
    from concept_influence_benchmarks.speed_sizes import SizeConfig, run_size_benchmark

    cfg = SizeConfig(size="tiny", n_examples=8, seq_len=16, batch_size=4, concept_layer=1, n_eval=2, many_concepts=3,
                     query_rank=2, threads=1, rounds=2, memory_examples=0)
    report = run_size_benchmark(tmp_path, cfg)
    stages = report["stages"]
    has_bergson = bergson_unavailable() is None
    assert list(stages) == ["floor", "train_step", "ekfac_fit", "concept_influence_k1", "concept_influence_k3",
                            "concept_influence_k1_lowrank", "concept_influence_k3_lowrank", "probe_projection",
                            "kronfluence_k1"] + ["bergson_k1"] * has_bergson + ["kronfluence_k3"] + ["bergson_k3"] * has_bergson
    flop = {name: entry["flops_per_example"] / stages["floor"]["flops_per_example"] for name, entry in stages.items()}
    assert 1.4 < flop["train_step"] < 1.6
    assert flop["probe_projection"] < 0.9 < flop["concept_influence_k1_lowrank"] < flop["concept_influence_k1"]
    assert stages["concept_influence_k1_lowrank"]["spearman_vs_full_rank"] > 0.5
    assert stages["kronfluence_k1"]["spearman_vs_ours"] > 0.99 and stages["kronfluence_k3"]["spearman_vs_ours"] > 0.99
    for name in ("ekfac_fit", "concept_influence_k1", "kronfluence_k1") + ("bergson_k1",) * has_bergson:
        runs = stages[name]["all_seconds"]
        assert len(runs) == 2 and stages[name]["seconds"] == pytest.approx(sum(runs) / 2), name
    assert "all_seconds" not in stages["kronfluence_k3"] and "all_seconds" not in stages["floor"]
    assert len(stages["kronfluence_k1"]["all_fit_seconds"]) == 2
    assert stages.get("bergson_k1", {"spearman_vs_ours": 1})["spearman_vs_ours"] > 0.9  # random lengths: see BERGSON_DIFFERENCES
    assert all(entry["seconds"] > 0 for entry in stages.values())
    assert report["own_process_memory"] == {}
    text = (tmp_path / "speed-tiny.md").read_text()
    assert "alone in a fresh process" not in text and "**floor**" in text and "vs ours" in text
    assert "kronfluence 1.0.1, K = 3 (fit + 3 scoring runs)" in text and "kronfluence, K = 3:" in text
    assert "`concept-influence bench speed --size tiny --out benchmarks --examples 8 --rounds 2`" in text
    assert json.loads((tmp_path / "speed-tiny.json").read_text())["stages"]


def test_size_benchmark_runs_the_stages_asked_for(tmp_path):
    """``stages`` picks stages (the floor and the fit always run); one round and no library: no comparison lines; the
    compared stages selected (the fit) measured again alone in a fresh process."""
    from concept_influence_benchmarks.speed_sizes import SizeConfig, run_size_benchmark

    cfg = SizeConfig(size="tiny", n_examples=4, seq_len=16, batch_size=4, concept_layer=1, n_eval=2, many_concepts=2,
                     threads=1, kronfluence=False, stages=("probe_projection",), rounds=1, memory_examples=4)
    report = run_size_benchmark(tmp_path, cfg)
    assert list(report["stages"]) == ["floor", "ekfac_fit", "probe_projection"]
    own = report["own_process_memory"]
    assert list(own) == ["ekfac_fit"] and own["ekfac_fit"]["rise_mib"] >= 0 and own["ekfac_fit"]["peak_mib"] > 0
    text = (tmp_path / "speed-tiny.md").read_text()
    assert "alone in a fresh process" in text and "Each stage once, in this order; FLOPs" in text
    assert "†" not in text and "/ ours" not in text
    assert "--rounds 1 --no-kronfluence`" in text


@pytest.mark.parametrize("flag", ["--examples", "--rounds"])
def test_size_benchmark_refuses_fewer_than_one(tmp_path, capsys, flag):
    from concept_influence.cli import main

    assert main(["bench", "speed", "--size", "tiny", "--out", str(tmp_path), flag, "0"]) == 2
    name = {"--examples": "n_examples", "--rounds": "rounds"}[flag]
    assert capsys.readouterr().err.strip() == f"concept-influence: error: {name} must be at least 1, got 0"
    assert not list(tmp_path.iterdir())


def _bergson_or_skip() -> None:
    reason = bergson_unavailable()
    if reason:
        pytest.skip(reason)


def test_bergson_agrees(tmp_path, tokenizer, tokenized):
    """With as many response tokens in every example, Bergson's Fisher (weights 1/T per example) is ours
    (1/T²) times T, so with relative damping its scores are ours / T, here to float rounding (measured: largest
    relative difference 3e-5, Spearman 1.0; with the fixture's unequal lengths Spearman is 0.89, see
    BERGSON_DIFFERENCES)."""
    _bergson_or_skip()
    n_response = 4
    examples = [dataclasses.replace(e, input_ids=e.input_ids[:e.response_start + n_response]) for e in tokenized]
    assert all(e.n_response_tokens == n_response for e in examples)
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    gen = torch.Generator().manual_seed(0)
    directions = [ConceptDirection(torch.randn(adapter.d_model, generator=gen), "blocks.0.hook_resid_post")
                  for _ in range(2)]
    concept = ConceptFunction.from_directions(directions, eval_examples=tokenized[:4])
    both = ConceptInfluence(concept, "ekfac").score(adapter, examples, batch_size=4, progress=False)
    bergson = bergson_concept_scores(adapter, examples, concept, tmp_path / "bergson", batch_size=4)
    assert bergson["scores"].shape == (len(examples), 2)  # both concepts' queries in one scoring pass
    assert_close_in_norm(bergson["scores"][:, 1] * n_response, both.column(1), 1e-4)  # in norm: ~9e-6 here
    ours = both.column(0)
    assert bergson["tracked_modules"] == [f"layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "self_attn.o_proj",
                                                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert spearmanr(ours, bergson["scores"][:, 0]).statistic == pytest.approx(1.0)
    assert_close_in_norm(bergson["scores"][:, 0] * n_response, ours, 1e-4)
    assert all(s > 0 for s in (bergson["fit_seconds"], bergson["score_seconds"], bergson["label_seconds"]))


@pytest.mark.xdist_group("speed_quick_run")
def test_part_b_table_has_bergson(tmp_path, request):
    """Part B on a tiny configuration: Bergson gets a column of figures beside kronfluence, or, when it cannot
    run, a row that says why."""
    pytest.importorskip("kronfluence")
    _bergson_or_skip()
    cfg = SpeedConfig(n_train=24, n_probe=40, n_eval=6, vocab_size=300, n_layers=1, d_model=32, concept_layer=0,
                      epochs=1, kron_n_train=16, kron_rounds=1)
    part_b = run_part_b(cfg, prepare_speed_data(cfg, tmp_path, train_tokenizer=True), tmp_path)
    entry = part_b["pipelines"]["bergson"]
    assert entry["spearman"] > 0.8 and all(entry[k] > 0 for k in ("fit_seconds", "score_seconds"))
    results = copy.deepcopy(request.getfixturevalue("quick_run")[0])  # only once nothing is skipped
    results["part_b"] = part_b
    results["memory"].update(dict.fromkeys(part_b["pipelines"]))  # part B's stages not measured here
    table = [line for line in format_markdown(results).splitlines() if line.startswith("| ")]
    assert table[-9].endswith("| Bergson |") and table[-1].startswith("| Pearson with ours |")
    assert len(table[-1].split("|")) == len(table[-9].split("|"))  # one cell per pipeline, Bergson's included

    del part_b["pipelines"]["bergson"]
    part_b["bergson"] = {"error": "bergson is not importable (test)"}
    report = format_markdown(results)
    assert "| Bergson | not run: bergson is not importable (test) | | |" in report
