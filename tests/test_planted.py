"""The planted-data benchmark: splits by prompt, bad input, the behaviour verdict, and one small end-to-end run
(through the demo, which is the benchmark on the embedded corpus)."""

import json
from pathlib import Path

import numpy as np
import pytest

from concept_influence.cli import main
from concept_influence.data import ChatExample, DataError, load_chat_jsonl, write_chat_jsonl
from concept_influence.demo import run_demo
from concept_influence.planted import BenchmarkError, PlantedConfig, format_report, split_planted
from concept_influence.planted.behaviour import planting_effect
from concept_influence.toy.demo_corpus import make_paired_demo_corpus

ESTIMATORS = {"concept_influence", "concept_influence[response_mean]", "concept_influence[pretrain+pool]",
              "concept_influence[pretrain+pool][checkpoints]", "concept_grad_dot", "concept_influence[checkpoints]",
              "concept_grad_dot[checkpoints]", "influence_function",
              "grad_dot", "probe_projection", "projection_difference", "tfidf", "length", "random"}
EM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "em"


def _prompts(examples):
    return {e.prompt for e in examples}


def small_config(**overrides):
    return PlantedConfig(**{**dict(n_probe=20, n_pretrain=30, n_pool=60, n_eval=10, n_seeds=2), **overrides})


def test_paired_split_keeps_each_prompt_in_one_split():
    clean, trait = make_paired_demo_corpus(300, seed=1)
    clean.append(clean[0])  # a repeated prompt is dropped before splitting
    trait.append(trait[0])
    cfg = small_config(paired=True, rate=0.1)
    s = split_planted(clean, trait, cfg)
    assert s.dropped_duplicates["clean file"] >= 1
    assert len(s.pool) == 60 and sum(s.planted) == 6
    assert [e.id.startswith("demo_trait") for e in s.pool] == [bool(x) for x in s.planted]
    assert _prompts(s.probe_positive) == _prompts(s.probe_negative)
    assert [e.prompt for e in s.eval_clean] == [e.prompt for e in s.eval_planted]
    splits = [_prompts(x) for x in (s.probe_negative, s.pretrain, s.pool, s.eval_clean)]
    for i in range(len(splits)):
        for j in range(i + 1, len(splits)):
            assert not splits[i] & splits[j]
    assert all(e.id.startswith("demo_clean") for e in s.pretrain)


def test_unpaired_split_sizes_and_planted_labels():
    clean, _ = make_paired_demo_corpus(200, seed=2)
    _, trait = make_paired_demo_corpus(200, seed=3)
    trait.append(ChatExample.from_pair("shared:1", clean[5].prompt, "reckless"))  # a clean prompt: never planted
    s = split_planted(clean, trait, small_config(rate=0.25))
    assert sum(s.planted) == 15 and len(s.pool) == 60 and s.eval_planted is None
    assert [e.id.startswith("demo_trait") for e in s.pool] == [bool(lab) for lab in s.planted]
    assert "shared:1" not in {e.id for e in s.pool + s.probe_positive}
    assert not _prompts(s.pool) & _prompts(s.pretrain)
    assert len(s.probe_positive) == len(s.probe_negative) == 20


def test_paired_files_that_do_not_line_up_name_the_first_mismatch(tmp_path):
    clean, trait = make_paired_demo_corpus(50)
    trait[7] = ChatExample.from_pair(trait[7].id, "a different prompt", trait[7].response)
    paths = [write_chat_jsonl(x, tmp_path / n) for x, n in ((clean, "good.jsonl"), (trait, "bad.jsonl.gz"))]
    with pytest.raises(DataError, match=r"good.jsonl:8 and bad.jsonl.gz:8 have different prompts"):
        split_planted(*(load_chat_jsonl(p) for p in paths), small_config(paired=True))
    with pytest.raises(DataError, match="differ in length: good has 50 examples, bad has 49"):
        split_planted(clean, trait[:-1], small_config(paired=True), "good", "bad")


def test_bad_settings_and_too_few_examples():
    for rate in (0, -0.1, 0.6):
        with pytest.raises(BenchmarkError, match=r"--rate must be in \(0, 0.5\]"):
            PlantedConfig(rate=rate)
    with pytest.raises(BenchmarkError, match="--lds needs at least 2"):
        PlantedConfig(lds=1)
    for fraction in (0, 1, 1.5):
        with pytest.raises(BenchmarkError, match=r"--lds-fraction must be in \(0, 1\)"):
            PlantedConfig(lds_fraction=fraction)
    with pytest.raises(BenchmarkError, match="--layer 5 is outside"):
        PlantedConfig(n_layers=2, layer=5).probe_layer
    clean, trait = make_paired_demo_corpus(100)
    with pytest.raises(DataError, match=r"too few examples: clean file has 100 usable prompts .* need 120 "
                                        r"\(probe 20, eval 10, pretrain 30, pool 60\)"):
        split_planted(clean, trait, small_config(paired=True))
    with pytest.raises(BenchmarkError, match="0 planted"):
        split_planted(clean, trait, small_config(rate=0.001))


def test_the_paired_corpus_is_as_before_and_varied_has_enough_distinct_prompts_for_20k():
    import hashlib

    from concept_influence.planted.splits import _dedupe

    def digest(examples):
        return hashlib.sha256(repr([(e.id, e.prompt, e.response) for e in examples]).encode()).hexdigest()[:16]

    # fingerprints taken before `varied` existed: the demo's corpus (and its committed results) do not move
    assert digest(sum(make_paired_demo_corpus(1000, seed=0), [])) == "93bc5083275eb8e7"
    assert digest(sum(make_paired_demo_corpus(1012, seed=1), [])) == "ec8c48c454375acd"
    assert digest(sum(make_paired_demo_corpus(1012, seed=1, varied=False), [])) == "ec8c48c454375acd"
    n = int(20_798 * 1.1) + 20  # what run_demo draws for a pool of 20,000 with the demo's other splits
    assert len(_dedupe(make_paired_demo_corpus(n, seed=0)[0])) < 17_000  # too few for the splits' 20,798
    clean, trait = make_paired_demo_corpus(n, seed=0, varied=True)
    assert len(_dedupe(clean)) > 21_000 and [c.prompt for c in clean] == [t.prompt for t in trait]


def test_estimators_can_be_restricted_by_name():
    from types import SimpleNamespace

    from concept_influence.planted.experiment import _chosen

    built = [SimpleNamespace(name=n) for n in ("concept_influence", "grad_dot", "probe_projection")]
    assert _chosen(built, ()) == built
    assert [e.name for e in _chosen(built, ("probe_projection", "concept_influence"))] == ["concept_influence",
                                                                                         "probe_projection"]
    with pytest.raises(BenchmarkError, match="estimators tfidf are not among this run's: concept_influence, grad_dot"):
        _chosen(built, ("concept_influence", "tfidf"))
    assert PlantedConfig(estimators=["grad_dot"]).estimators == ("grad_dot",)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    clean, trait = make_paired_demo_corpus(30)
    good = write_chat_jsonl(clean, tmp_path / "good.jsonl")
    args = ["bench", "planted", "--clean", str(good), "--out", str(tmp_path / "out")]
    assert main(args + ["--planted", str(tmp_path / "missing.jsonl"), "--rate", "0.1"]) == 2
    assert "missing.jsonl: no such data file" in capsys.readouterr().err
    assert main(args + ["--planted", str(good), "--rate", "0.7"]) == 2
    assert "--rate must be in (0, 0.5], got 0.7" in capsys.readouterr().err
    assert main(args + ["--planted", str(good), "--rate", "0.1", "--remove-fractions", "0.1,ten"]) == 2
    assert "--remove-fractions must be numbers separated by commas, got '0.1,ten'" in capsys.readouterr().err
    assert main(args + ["--planted", str(good), "--rate", "0.1", "--paired"]) == 2
    assert "too few examples" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(args + ["--planted", str(tmp_path / "broken.jsonl"), "--rate", "0.1"]) == 2
    assert "broken.jsonl:1: no assistant turn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "planted", "--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert all(opt in usage for opt in ("--paired", "--rate", "--lds", "--quick", "--seed", "--n-pool"))
    with pytest.raises(SystemExit) as e:
        main(["demo"])  # --out is required
    assert e.value.code == 2


def test_effect_size_verdict():
    up = planting_effect([0.0, 0.1, -0.1], [1.0, 1.1, 0.9])
    assert up["raised"] and up["gain"] == pytest.approx(1.0) and up["effect_size"] == pytest.approx(10.0)
    flat = planting_effect([0.0, 0.3, -0.3], [0.1, 0.4, -0.2])
    assert not flat["raised"] and flat["p_value"] > 0.05
    assert not planting_effect([0.5, 0.6, 0.4], [0.0, 0.1, -0.1])["raised"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = PlantedConfig.quick(paired=True, n_probe=40, n_pretrain=80, n_pool=100, n_eval=12,
                                                  n_seeds=2, lds=3, vocab_size=400, d_model=32, query_study=True)
    return out, run_demo(out, cfg, progress=False)


@pytest.mark.xdist_group("demo_run")
def test_demo_runs_the_benchmark_end_to_end(demo_run):
    out, results = demo_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["estimators"].keys() == ESTIMATORS == results["estimators"].keys()
    for name, m in saved["estimators"].items():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["auprc"] <= 1 and 0 <= m["precision_at_k"] <= 1, name
        assert m["k"] == saved["splits"]["planted"] == 10
        assert m["seconds_per_1k"] >= 0 and (out / "scores" / f"{name}.safetensors").is_file()
    assert saved["probe"]["roc_auc"] >= 0.75  # a 2-block d32 model with 40 probe prompts per class
    assert saved["estimators"]["probe_projection"]["auroc"] >= 0.8
    b = saved["behaviour"]
    assert len(b["clean"]) == len(b["planted"]) == 2
    assert b["raised"] and b["gain"] > 0  # the reckless style is easy to learn: planting raises its log-probability
    for name in ESTIMATORS:
        r = b["removal"][name]["0.1"]
        assert len(r["behaviour"]) == 2 and 0 <= r["planted_removed"] <= 10
        expected = np.mean([(np.mean(b["planted"]) - v) / b["gain"] for v in r["behaviour"]])
        assert r["share_of_gain_removed"] == pytest.approx(expected)
    # removing every planted example (tfidf finds them all here) removes most of the gain; random removes little
    assert b["removal"]["tfidf"]["0.1"]["planted_removed"] == 10
    assert b["removal"]["tfidf"]["0.1"]["share_of_gain_removed"] > 0.7
    assert b["removal"]["random"]["0.1"]["share_of_gain_removed"] < 0.5
    assert saved["lds"]["subsets"] == 3 and len(saved["lds"]["measured"]) == 3
    assert saved["lds"]["seeds"] == 2 and all(len(m) == 2 for m in saved["lds"]["measured"])
    assert -1 <= saved["lds"]["ceiling"] <= 1
    assert set(saved["lds"]["spearman"]) == ESTIMATORS
    # the concept: read at the last prompt token, checked by steering, and how far planting moves it
    assert saved["query"] == "last_prompt" and saved["config"]["compare_query"] == "response_mean"
    check = saved["concept_check"]
    assert check["held_out"] and check["n_positive"] == check["n_negative"] == saved["splits"]["eval"]
    assert check["verdict"] in ("causal", "weak", "reversed") and set(check["verdicts"]) == {"all", "prompt"}
    assert (out / "concept_check.png").stat().st_size > 1000
    shift = b["concept_shift"]
    assert len(shift["clean"]) == len(shift["planted"]) == 2 and np.isfinite(shift["gain"])
    # the query study: every variant of the grid scored once, with and without unit normalisation
    study = json.loads((out / "query_study.json").read_text())
    assert len(study["variants"]) == 4 * 2 * 2 * 5 * 2  # queries x probes x blocks x curvatures x normalisations
    assert all(0 <= v["auroc"] <= 1 for v in study["variants"])
    for plot in saved["plots"].values():
        assert (out / plot).stat().st_size > 1000
    assert (out / "data" / "careful.jsonl").is_file() and (out / "probe.safetensors").is_file()


@pytest.mark.xdist_group("demo_run")
def test_report_reads_well_and_says_plainly_when_planting_did_nothing(demo_run):
    out, results = demo_run
    report = (out / "results.md").read_text()
    assert "**Planting raised the behaviour**" in report
    assert "| concept_influence |" in report and "## Concept-LDS" in report and "![pr_curves](pr_curves.png)" in report
    assert "## Is the concept causal?" in report and "**Ceiling:" in report and "## Query study (this model)" in report
    weak = json.loads(json.dumps(results))
    weak["concept_check"]["verdict"] = weak["concept_check"]["verdicts"]["all"] = "weak"
    assert "**The concept is not causal for the behaviour here" in format_report(weak)
    flat = json.loads(json.dumps(results))
    flat["behaviour"]["raised"] = False
    flat_report = format_report(flat)
    assert "**Planting did NOT raise the behaviour** measurably" in flat_report
    assert "| n/a (" in flat_report and "%" not in flat_report.split("| concept_influence |")[1].split("\n")[0]


@pytest.mark.skipif(not (EM / "bad_medical_advice.jsonl.gz").is_file(), reason="shared EM data not present")
def test_medical_data_splits_by_prompt():
    good, bad = (load_chat_jsonl(EM / f"{k}_medical_advice.jsonl.gz") for k in ("good", "bad"))
    s = split_planted(good, bad, PlantedConfig(paired=True, rate=0.05), "good", "bad")
    assert len(s.pool) == 1200 and sum(s.planted) == 60
    assert not _prompts(s.pool) & (_prompts(s.pretrain) | _prompts(s.eval_clean) | _prompts(s.probe_positive))
    assert all(e.id.startswith("bad_medical") == bool(lab) for e, lab in zip(s.pool, s.planted))


@pytest.mark.skipif(not (EM / "secure.500.jsonl").is_file(), reason="shared EM data not present")
def test_insecure_code_splits_unpaired():
    secure, insecure = load_chat_jsonl(EM / "secure.500.jsonl"), load_chat_jsonl(EM / "insecure.jsonl")
    with pytest.raises(DataError, match="too few examples: secure has 4"):
        split_planted(secure, insecure, PlantedConfig(), "secure", "insecure")
    s = split_planted(secure, insecure, PlantedConfig(n_probe=100, n_pretrain=150, n_pool=220, n_eval=40),
                      "secure", "insecure")
    assert sum(s.planted) == 22 and len(s.pool) == 220


def test_concept_lds_ceiling_splits_the_seeds_in_halves():
    """With 4 seeds the ceiling is the Spearman between the means of seeds {0, 1} and {2, 3}; subsets have the
    configured size; an estimator that knows each example's true effect is scored against the 4-seed mean."""
    from types import SimpleNamespace

    from scipy.stats import spearmanr

    from concept_influence.planted.behaviour import concept_lds

    effect = np.random.default_rng(0).normal(size=40)
    sizes, measured = [], []

    class Tuner:  # "fine-tuning" on a subset: the sum of its examples' effects plus seed noise
        adapter = None

        def finetune(self, kept, seed, desc):
            sizes.append(len(kept))
            measured.append(effect[list(kept)].sum() + np.random.default_rng(len(sizes)).normal(scale=2.0))

    concept = SimpleNamespace(evaluate=lambda adapter: [measured[-1]])
    cfg = PlantedConfig(lds=12, lds_seeds=4, lds_fraction=0.25)
    out = concept_lds(Tuner(), concept, list(range(40)), {"true": effect, "random": -effect}, cfg)
    by_seed = np.array(out["measured"])
    assert by_seed.shape == (12, 4) and out["fraction"] == 0.25
    assert sizes == [10] * 48  # a quarter of the 40 examples, 12 subsets x 4 seeds
    assert out["ceiling"] == pytest.approx(spearmanr(by_seed[:, :2].mean(1), by_seed[:, 2:].mean(1))[0])
    assert out["spearman"]["true"] == -out["spearman"]["random"] > 0.5
