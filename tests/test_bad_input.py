"""Bad input at the command line, as a table: each case exits with status 2 and one line naming the file, line, key
or option at fault; no file that existed before is changed or lost, and a run folder keeps every stage it finished.
The four cases issue 21 found silent: a probe at chance (same texts both sides, or a copy of them), an empty answer,
the concept check on one file twice, an empty evaluation file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder import make_project

from concept_influence.cli import main
from concept_influence.config import MIN_PROBE_AUROC
from concept_influence.fileio import file_sha256
from concept_influence.models import HFCausalLMAdapter, load_model, save_model
from concept_influence.runs import Run
from concept_influence.scores import Scores
from probes import ConceptDirection

N = 40


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The run-folder project (40 chats) plus: an empty file, a copy of pos.jsonl in reverse order, the chats with
    line 5's answer blank, a saved direction, score files of train.jsonl and of another file, and a tiny Llama."""
    from test_peft import _tiny_llama

    root = make_project(tmp_path_factory.mktemp("bad"), N)
    (root / "empty.jsonl").write_text("")
    (root / "pos_reversed.jsonl").write_text("".join(reversed((root / "pos.jsonl").read_text().splitlines(True))))
    lines = (root / "train.jsonl").read_text().splitlines(True)
    blank = json.loads(lines[4])
    blank["messages"][-1]["content"] = "  "
    (root / "train_blank.jsonl").write_text("".join(lines[:4] + [json.dumps(blank) + "\n"] + lines[5:]))
    ConceptDirection(torch.randn(32), "blocks.0.hook_resid_post").save(root / "dir.safetensors")
    values = np.arange(N, dtype=float)[:, None]
    Scores([f"train.jsonl:{i}" for i in range(1, N + 1)], values, "concept_influence", ["c"]).save(root / "s.safetensors")
    Scores([f"other.jsonl:{i}" for i in range(1, N + 1)], values, "concept_influence", ["c"]).save(root / "other.safetensors")
    tokenizer = load_model(root / "model").tokenizer
    save_model(HFCausalLMAdapter(_tiny_llama(len(tokenizer), max_position_embeddings=128), tokenizer), root / "llama")
    return root


def _config(root: Path, name: str, *changes: str) -> str:
    """run.toml with each ``old, new`` pair of ``changes`` replaced (an ``old`` of ``[x]`` adds lines to section x)."""
    text = (root / "run.toml").read_text()
    for old, new in zip(changes[::2], changes[1::2]):
        assert old in text, old
        text = text.replace(old, new, 1)
    (root / name).write_text(text)
    return str(root / name)


MODEL = '[model]\npath = "model"\n'
PROBE = 'positive = "pos.jsonl"\nnegative = "neg.jsonl"\n'
RUN = {  # name: (config changes, the error's words); each is `run CONFIG --out NEW`
    "unknown key": (("[scoring]\n", "[scoring]\nshardsize = 8\n"), "unknown key 'scoring.shardsize' (did you mean shard_size?)"),
    "checkpoints word": ((MODEL, MODEL + 'checkpoints = "all"\n'), 'model.checkpoints must be "auto" or a list of checkpoints'),
    "weights alone": ((MODEL, MODEL + 'weights = "lr"\n'), "model.weights multiply the scores of each checkpoint"),
    "weights count": ((MODEL, MODEL + 'checkpoints = ["base"]\nweights = [1, 2]\n'), "model.weights: 2 weights for 1"),
    "require without check": (("[concept]\n", '[concept]\ncheck = false\nrequire = "causal"\n'),
                              'concept.require = "causal" needs the check'),
    "remove_top": (("[scoring]\n", "[filter]\nremove_top = 1.5\n\n[scoring]\n"),
                   "filter.remove_top must be a fraction in (0, 1) or a whole count, got 1.5"),
    "factors.path and checkpoints": ((MODEL, MODEL + 'checkpoints = ["model"]\n', "[factors]\n", '[factors]\npath = "x"\n'),
                                     "factors.path is one curvature; with model.checkpoints"),
    "missing checkpoint": ((MODEL, MODEL + 'checkpoints = ["ckpt/none"]\n'), "ckpt/none: no such checkpoint (model.checkpoints)"),
    "auto without TRL folder": ((MODEL, MODEL + 'checkpoints = "auto"\n'), "needs a TRL output folder with checkpoint-N"),
    "lr without steps": ((MODEL, MODEL + 'checkpoints = ["base", "model"]\nweights = "lr"\n'),
                         "needs each checkpoint's step from its folder name (checkpoint-N"),
    "base of a full model": ((MODEL, MODEL + 'checkpoints = ["base", "model"]\n'),
                             '"base" of a model that is not a PEFT adapter is the model before fine-tuning; give its folder'),
    "same probe files": ((PROBE, 'positive = "pos.jsonl"\nnegative = "pos.jsonl"\n'),
                         "probe.positive and probe.negative are the same data"),
    "probe at chance": ((PROBE, 'positive = "pos.jsonl"\nnegative = "pos_reversed.jsonl"\n'),
                        "is at chance: held-out AUROC"),
    "same check files": (("[concept]\n", '[concept]\ncheck_positive = "neg.jsonl"\ncheck_negative = "neg.jsonl"\n'),
                         "concept.check_positive and concept.check_negative are the same data"),
    "empty answer": (('train = "train.jsonl"', 'train = "train_blank.jsonl"'),
                     "train_blank.jsonl:5: the assistant's answer (the response that is scored) is empty"),
    "empty eval file": (("[concept]\n", '[concept]\neval = "empty.jsonl"\n'),
                        "empty.jsonl: no usable examples (it has no examples)"),
    "empty probe file": ((PROBE, 'positive = "empty.jsonl"\nnegative = "neg.jsonl"\n'),
                         "empty.jsonl: no usable examples (it has no examples)"),
    "missing eval file": (("[concept]\n", '[concept]\neval = "gone.jsonl"\n'),
                          "gone.jsonl: no such file or folder (concept.eval)"),
    "missing SAE": (("[scoring]\n", '[explain]\nsae = "no-sae"\n\n[scoring]\n'), "no-sae: no such file or folder (explain.sae)"),
    "hook typo": (('hook = "blocks.0.hook_resid_post"', 'hook = "blocks.0.hook_resid_pots"'), "blocks.0.hook_resid_post"),
    "empty training file": (('train = "train.jsonl"', 'train = "empty.jsonl"'), "empty.jsonl: the file has no examples"),
}
CHECK = ["concept", "check", "--model", "{root}/model", "--direction", "{root}/dir.safetensors"]
BENCH = ["bench", "planted", "--clean", "{root}/neg.jsonl", "--planted", "{root}/pos.jsonl", "--out", "{tmp}/bench"]
COMMANDS = {  # name: (argv, the error's words)
    "missing config": (["run", "{root}/nope.toml"], "nope.toml: no such config file"),
    "filter with another file's scores": (["filter", "{root}/other.safetensors", "{root}/train.jsonl", "{tmp}/f.jsonl",
                                           "--remove-top", "1"], "the scores do not match"),
    "filter onto an existing file": (["filter", "{root}/s.safetensors", "{root}/train.jsonl", "{root}/pos.jsonl",
                                      "--remove-top", "1"], "pos.jsonl exists; choose another output"),
    "filter with unreadable scores": (["filter", "{root}/pos.jsonl", "{root}/train.jsonl", "{tmp}/f.jsonl",
                                       "--remove-top", "1"], "pos.jsonl: cannot read scores"),
    "sum of different examples": (["sum-scores", "{tmp}/t.safetensors", "{root}/s.safetensors", "{root}/other.safetensors"],
                                  "scores 2 and scores 1 differ in their ids"),
    "sum with too few weights": (["sum-scores", "{tmp}/t.safetensors", "{root}/s.safetensors", "{root}/s.safetensors",
                                  "--weights", "1"], "1 weights for 2 sets of scores"),
    "sum onto an existing file": (["sum-scores", "{root}/s.safetensors", "{root}/s.safetensors"],
                                  "s.safetensors exists; give --force to replace it"),
    "check on one file twice": (CHECK + ["--positive", "{root}/pos.jsonl", "--negative", "{root}/pos.jsonl"],
                                "--positive and --negative are the same data"),
    "check on an empty file": (CHECK + ["--positive", "{root}/pos.jsonl", "--negative", "{root}/empty.jsonl"],
                               "--negative: {root}/empty.jsonl: no usable examples (it has no examples)"),
    "check on an empty answer": (CHECK + ["--positive", "{root}/train_blank.jsonl", "--negative", "{root}/neg.jsonl"],
                                 "--positive: {root}/train_blank.jsonl:5: the assistant's answer"),
    "bench --model with small-model sizes": (BENCH + ["--rate", "0.1", "--model", "{root}/llama", "--n-layers", "4"],
                                             "--n-layers describe the small model trained here"),
    "bench --model on a TransformerLens folder": (BENCH + ["--rate", "0.1", "--model", "{root}/model"],
                                                  "expected a Hugging Face causal LM folder without adapters"),
    "bench --lora-targets unknown": (BENCH + ["--rate", "0.1", "--model", "{root}/llama", "--lora-targets", "nope",
                                              "--max-length", "64"], "--lora-targets nope:"),
    "bench --max-length beyond the model": (BENCH + ["--rate", "0.1", "--model", "{root}/llama"],
                                            "--max-length 256 exceeds the model's context length 128"),
    "bench --lora-rank 0": (BENCH + ["--rate", "0.1", "--model", "{root}/llama", "--lora-rank", "0"],
                            "--lora-rank must be at least 1, got 0"),
    "bench rate": (BENCH + ["--rate", "0.7"], "--rate must be in (0, 0.5], got 0.7"),
    "score without a run folder": (["score", "{tmp}/none"], "not a run folder (no run.json)"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading weights")]
    assert err and err[-1].startswith("concept-influence: error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    return err[-1]


def test_the_table_has_at_least_thirty_cases():
    assert len(RUN) + len(COMMANDS) >= 30


@pytest.mark.parametrize("name", sorted(RUN))
def test_bad_run_config(root, tmp_path, capsys, name):
    changes, words = RUN[name]
    config = _config(root, f"{name.replace(' ', '_')}.toml", *changes)
    before = _snapshot(root)
    out = tmp_path / "run"
    error = _fails(["run", config, "--out", str(out), "--no-progress"], capsys)
    assert words in error, error
    assert all(_snapshot(root).get(k) == v for k, v in before.items()), "a file that existed was changed or lost"
    if (out / "run.json").is_file():  # every stage the run finished before the error is on disk
        run = Run.open(out)
        kept = {"probe": run.direction_path, "check": out / "check" / "concept_check.json",
                "factors": out / "factors" / "curvature.json"}
        assert all(path.is_file() for stage, path in kept.items() if run.is_done(stage))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bad_command(root, tmp_path, capsys, name):
    argv, words = COMMANDS[name]
    before = _snapshot(root)
    error = _fails([a.format(root=root, tmp=tmp_path) for a in argv], capsys)
    assert words.format(root=root) in error, error
    assert _snapshot(root) == before


def test_a_probe_at_chance_names_the_metric_and_both_files_and_can_be_allowed(root, tmp_path, capsys):
    config = _config(root, "chance.toml", PROBE, 'positive = "pos.jsonl"\nnegative = "pos_reversed.jsonl"\n',
                     "[scoring]\n", '[scoring]\nestimator = "probe_projection"\n')
    out = tmp_path / "run"
    error = _fails(["run", config, "--out", str(out), "--no-progress"], capsys)
    auroc = float(error.split("held-out AUROC ")[1].split(" ")[0])
    assert auroc < MIN_PROBE_AUROC and f"{root}/pos.jsonl and {root}/pos_reversed.jsonl" in error
    assert "--allow-weak-probe" in error and not (out / "probe" / "direction.safetensors").exists()
    assert main(["probe", "train", str(out), "--allow-weak-probe", "--no-progress"]) == 0  # the same folder goes on
    assert json.loads((out / "config.json").read_text())["probe"]["allow_weak"] is True
    assert f"held-out AUROC {Run.open(out).record['stages']['probe']['metrics']['roc_auc']:.2f} " in error
    shutil.rmtree(out)


def test_the_check_says_a_direction_that_does_not_separate_does_not(root, capsys):
    """The same texts in another order (so not refused as the same file): the projection's AUROC is exactly 0.5, and
    the explanation says the direction does not separate them."""
    argv = [a.format(root=root) for a in CHECK] + ["--positive", str(root / "pos.jsonl"),
                                                   "--negative", str(root / "pos_reversed.jsonl"), "--max-examples", "40"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "separation: AUROC 0.500" in out
    assert "the direction does not separate the texts (AUROC 0.50, chance is 0.5" in out
    assert "the direction separates" not in out


def test_the_weak_probe_option_names_the_threshold_the_pipeline_uses():
    from concept_influence.cli import WEAK_PROBE_HELP  # spelled out there so that building the parser imports no torch

    assert f"below {MIN_PROBE_AUROC} " in WEAK_PROBE_HELP
