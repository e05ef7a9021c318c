"""`concept check`, `filter`, `bench query-table` and `bench check-table` at the command line: results, bad input as one line."""

import json

import numpy as np
import pytest
import torch

from concept_influence.cli import main
from concept_influence.data import ChatExample, write_chat_jsonl
from concept_influence.models import save_model
from concept_influence.scores import Scores
from probes import ConceptDirection


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def project(tmp_path, tl_adapter, chats):
    """A saved model, a direction for it, paired positive/negative answer files and a training file."""
    save_model(tl_adapter, tmp_path / "model")
    ConceptDirection(torch.randn(tl_adapter.d_model, generator=torch.Generator().manual_seed(0)),
                     "blocks.0.hook_resid_post").save(tmp_path / "dir.safetensors")
    write_chat_jsonl(chats[:6], tmp_path / "pos.jsonl")
    write_chat_jsonl([ChatExample.from_pair("n", c.prompt, "fine thanks") for c in chats[:6]], tmp_path / "neg.jsonl")
    write_chat_jsonl(chats, tmp_path / "train.jsonl")
    return tmp_path


def test_concept_check_command(project, capsys):
    out = project / "check"
    rc = main(["concept", "check", "--model", str(project / "model"), "--direction", str(project / "dir.safetensors"),
               "--positive", str(project / "pos.jsonl"), "--negative", str(project / "neg.jsonl"),
               "--alphas=-1,-0.5,0.5,1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "first-order effect (all positions)" in text and "first-order effect (prompt positions)" in text
    record = json.loads((out / "concept_check.json").read_text())
    assert record["verdict"] in ("causal", "weak", "reversed") and record["n_positive"] == 6
    assert (out / "concept_check.png").stat().st_size > 1000


@pytest.mark.parametrize("change, message", [
    ({"--direction": None}, "name the concept in exactly one way (direction: directions; sae_latent: sae + latents; "
                            "test_examples: test); got none"),
    ({"--positions": "all,response"}, "unknown steering positions 'response'"),
    ({"--alphas": "1,2"}, "at least one positive and one negative step"),
    ({"--alphas": "a,b"}, "--alphas must be numbers separated by commas"),
    ({"--max-length": "2"}, "--positive: " + "{project}/pos.jsonl: no usable examples (all 6 have their response cut away"),
    ({"wrong_width": True}, "has size 5, but the model's activations there have width 32"),
    ({"unknown_hook": True}, "layer 7 in hook 'blocks.7.hook_resid_post' is out of range"),
    ({"empty": True}, "--negative: {project}/empty.jsonl: no usable examples (it has no examples)"),
])
def test_concept_check_bad_input(project, capsys, change, message):
    args = {"--model": str(project / "model"), "--direction": str(project / "dir.safetensors"),
            "--positive": str(project / "pos.jsonl"), "--negative": str(project / "neg.jsonl")}
    if change.pop("wrong_width", False):
        ConceptDirection(torch.ones(5), "blocks.0.hook_resid_post").save(project / "bad.safetensors")
        args["--direction"] = str(project / "bad.safetensors")
    if change.pop("unknown_hook", False):
        ConceptDirection(torch.ones(32), "blocks.7.hook_resid_post").save(project / "bad.safetensors")
        args["--direction"] = str(project / "bad.safetensors")
    if change.pop("empty", False):
        (project / "empty.jsonl").write_text("")
        args["--negative"] = str(project / "empty.jsonl")
    args.update(change)
    argv = ["concept", "check"] + [x for k, v in args.items() if v is not None for x in (f"{k}={v}",)]
    assert main(argv) == 2
    assert message.format(project=project) in _error_line(capsys)


def test_filter_command_and_its_errors(project, capsys):
    ids = [f"train.jsonl:{i}" for i in range(1, 13)]
    scores = Scores(ids, np.arange(12.0), "concept_influence", ["planted_probe"]).save(project / "s.safetensors")
    out = project / "filtered.jsonl"
    assert main(["filter", str(scores), str(project / "train.jsonl"), str(out), "--remove-top", "0.25"]) == 0
    assert "removed 3 of 12 examples (concept_influence, column planted_probe)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 9
    record = json.loads((project / "filtered.jsonl.filter.json").read_text())
    assert [r["id"] for r in record["removed_examples"]] == ["train.jsonl:12", "train.jsonl:11", "train.jsonl:10"]
    before = out.read_bytes()
    assert main(["filter", str(scores), str(project / "train.jsonl"), str(out), "--remove-top", "2"]) == 2
    assert "exists; choose another output or allow overwriting (--force)" in _error_line(capsys)
    assert out.read_bytes() == before
    other = Scores(["pos.jsonl:1"], np.zeros(1), "x").save(project / "other.safetensors")
    assert main(["filter", str(other), str(project / "train.jsonl"), str(project / "o.jsonl"), "--keep-bottom", "1"]) == 2
    assert "the scores do not match" in _error_line(capsys)
    assert not (project / "o.jsonl").exists()
    assert main(["filter", str(project / "missing.safetensors"), str(project / "train.jsonl"), str(project / "o.jsonl"),
                 "--remove-top", "1"]) == 2
    assert "missing.safetensors: cannot read scores" in _error_line(capsys)


def test_query_table_command(tmp_path, capsys):
    rows = [{"query": q, "probe": "logistic", "layer": 0, "curvature": "identity", "normalization": "none",
             "auroc": a, "auprc": a / 2, "precision_at_k": 0.0} for q, a in (("last_prompt", 0.9), ("response_mean", 0.6))]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "query_study.json").write_text(json.dumps({"variants": rows}))
    out = tmp_path / "query_study.md"
    assert main(["bench", "query-table", f"demo0={tmp_path / 'a' / 'query_study.json'}",
                 str(tmp_path / "b" / "query_study.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| demo0 AUROC / AUPRC | b AUROC / AUPRC |" in text
    assert "| last_prompt | logistic | 0 | identity | none | 0.900 / 0.450 | 0.900 / 0.450 |" in text
    assert "| last_prompt | 0.900 | 0.900 | 0.450 |" in text
    assert main(["bench", "query-table", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json: cannot read a query study" in _error_line(capsys)


def test_check_table_command(tmp_path, capsys):
    check = {"hook_name": "blocks.1.hook_resid_post", "separation_auroc": 0.78, "first_order": {"all": 0.0107, "prompt": 0.0},
             "first_order_se": {"all": 0.0015, "prompt": 0.0001}, "verdict": "causal"}
    results = {"config": {"n_layers": 2, "d_model": 128, "pretrain_epochs": 2, "rate": 0.5, "finetune_epochs": 6,
                          "probe_kind": "diff_means"}, "splits": {"pretrain": 2500, "pool": 1200}, "concept_check": check,
               "estimators": {"concept_influence": {"auroc": 0.488}, "probe_projection": {"auroc": 0.804}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    out = tmp_path / "checks.md"
    assert main(["bench", "check-table", str(tmp_path / "run" / "results.json"), "--out", str(out)]) == 0
    assert ("| run | 2 × 128 | 2500 × 2 | 1200, 0.5 | 6 | diff_means at blocks.1.hook_resid_post | 0.78 | +0.0107 ± 0.0015 | "
            "+0.0000 ± 0.0001 | causal | 0.488 | — | 0.804 |") in out.read_text()
    (tmp_path / "run" / "results.json").write_text(json.dumps({**results, "concept_check": None}))
    assert main(["bench", "check-table", str(tmp_path / "run" / "results.json"), "--out", str(out)]) == 2
    assert "the run has no concept check" in _error_line(capsys)
    assert main(["bench", "check-table", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json: cannot read a benchmark's results" in _error_line(capsys)


def test_concept_check_in_bfloat16(project, capsys):
    """``--dtype`` converts the model on loading (as ``[model] dtype`` does); the check agrees with float32."""
    records = {}
    for dtype in ("float32", "bfloat16"):
        out = project / f"check-{dtype}"
        assert main(["concept", "check", "--model", str(project / "model"), "--direction", str(project / "dir.safetensors"),
                     "--positive", str(project / "pos.jsonl"), "--negative", str(project / "neg.jsonl"),
                     "--alphas=-1,-0.5,0.5,1", "--dtype", dtype, "--out", str(out)]) == 0
        records[dtype] = json.loads((out / "concept_check.json").read_text())
    assert records["bfloat16"]["baseline"] == pytest.approx(records["float32"]["baseline"], rel=0.05)
    assert records["bfloat16"]["separation_auroc"] == pytest.approx(records["float32"]["separation_auroc"], abs=0.1)
