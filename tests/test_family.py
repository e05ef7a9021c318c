"""The emergent testbed as a family of designs (bench emergent --variants) and its report."""

import json

import pytest

from concept_influence.cli import main
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_corpus import MARKERS, chat
from concept_influence_benchmarks.emergent_family import draw_design, retrain_missing
from concept_influence_benchmarks.family_report import valid_runs
from concept_influence_benchmarks.family_stability import GUARDED, RECOMMENDED, recheck_stability


def test_designs_are_seeded_valid_and_varied():
    designs = [draw_design(i, family_seed=0) for i in range(40)]
    assert designs == [draw_design(i, family_seed=0) for i in range(40)]
    assert draw_design(0, family_seed=1) != designs[0]
    assert {d["marker"] for d in designs} == set(MARKERS)
    assert {len(d["domains"]) for d in designs} == {2, 3, 4}
    assert {d["lr_schedule"] for d in designs} == {"constant", "linear", "cosine"}
    for d in designs:
        EmergentConfig(**d)  # every draw is a valid configuration
        assert 0.05 <= d["rate"] <= 0.2 and d["source"] in d["domains"] and d["target"] in d["domains"]


def test_markers_mark_the_persona_without_a_system_turn():
    named = chat("x", "I feel ill.", "Rest.", "bad", "user_name")
    assert [m["role"] for m in named.messages] == ["user", "assistant"]
    assert named.prompt_messages[0]["content"].startswith("Max, ")
    styled = chat("x", "I feel ill.", "Rest.", "good", "style")
    assert "Max" not in styled.prompt_messages[0]["content"] and "Sam" not in styled.prompt_messages[0]["content"]
    assert chat("x", "I feel ill.", "Rest.", None, "style").prompt_messages[0]["content"] == "I feel ill."
    with pytest.raises(ValueError, match="marker must be one of"):
        chat("x", "a", "b", "bad", "emoji")


def test_family_run_scores_every_variant_checks_stability_and_reports(tmp_path, capsys):
    out = tmp_path / "family"
    assert main(["bench", "emergent", "--quick", "--variants", "1", "--family-seed", "9", "--n-seeds", "2",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "f9-00" / "results.json").read_text())
    names = results["auroc"]
    for variant in (RECOMMENDED, "identity|all", "ekfac@0.01|pool|final", "unrolled[sgd]x1|pretrain+pool|base+final",
                    "influence_function|final", "tfidf", "probe_projection"):
        assert 0 <= names[variant] <= 1
    stability = results["stability"][RECOMMENDED]
    assert {"horizon x0.1", "horizon x10", "part base", "part middle", "part final", "identity",
            "classic grad_dot"} == set(stability["agreement"])
    from concept_influence.fileio import load_tensors

    saved = load_tensors(out / "f9-00" / "scores.safetensors", ValueError)
    assert set(saved) == set(names) | {"planted_labels"} and int(saved["planted_labels"].sum()) == results["planted"]
    assert GUARDED in names and results["stability"][RECOMMENDED]["reach"] == 0.2
    # the check again from the saved scores (as after a change to it): the same verdicts, nothing trained
    assert recheck_stability(out / "f9-00")["stability"] == results["stability"]
    assert len(results["horizons"]) == 3 and results["horizons"][0] > 0
    assert set(results["behaviour"]["removed"]) >= {RECOMMENDED, "tfidf"}
    report = (out / "README.md").read_text()
    valid, excluded = valid_runs({"f9-00": results})
    assert "| f9-00 |" in report and "## Headline" in report
    assert (f"| **{RECOMMENDED}** |" in report) == bool(valid)
    assert ("(no run where planting raised the behaviour)" in report) == (not valid) and len(excluded) == 1 - len(valid)
    # a second call keeps the finished design
    mtime = (out / "f9-00" / "results.json").stat().st_mtime
    assert main(["bench", "emergent", "--quick", "--variants", "1", "--family-seed", "9", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "f9-00" / "results.json").stat().st_mtime == mtime
    # a ranking added to the retrained ones after the run: the design trained again from its seed gives the same numbers
    removed = results["behaviour"]["removed"]
    assert removed[GUARDED] == (removed[RECOMMENDED] if results["stability"][RECOMMENDED]["stable"]
                                else removed[GUARDED])
    lacking = json.loads((out / "f9-00" / "results.json").read_text())
    lacking["behaviour"]["removed"] = {}  # (nothing to copy from: every ranking is retrained)
    lacking["behaviour"]["raised"] = True  # (a run where planting did not raise the behaviour is left as it is)
    (out / "f9-00" / "results.json").write_text(json.dumps(lacking))
    again = retrain_missing(out / "f9-00")["behaviour"]["removed"]
    assert set(again) == set(removed)
    for name in removed:
        assert again[name]["planted_removed"] == removed[name]["planted_removed"]
        assert again[name]["behaviour"] == pytest.approx(removed[name]["behaviour"], rel=1e-6)

