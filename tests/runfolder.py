"""A small project on disk for run-folder tests: a saved tiny model, chat JSONL files and a TOML config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from concept_influence.data import write_chat_jsonl
from concept_influence.demo_corpus import make_demo_corpus
from concept_influence.models import save_model
from concept_influence.smallmodel import build_small_model, train_bpe_tokenizer

N_TRAIN = 100

CONFIG = """
[model]
path = "model"

[data]
train = "train.jsonl"
max_length = 128

[probe]
hook = "blocks.0.hook_resid_post"
positive = "pos.jsonl"
negative = "neg.jsonl"
kind = "diff_means"

[concept]
max_examples = 24

[factors]
shard_size = 16

[scoring]
shard_size = 16
"""


def make_project(root: Path, n_train: int = N_TRAIN) -> Path:
    """Write ``model/``, ``train.jsonl``, ``pos.jsonl``, ``neg.jsonl`` and ``run.toml`` under ``root``."""
    corpus = make_demo_corpus(n_train=n_train, n_probe=40)
    write_chat_jsonl(corpus.train, root / "train.jsonl")
    write_chat_jsonl(corpus.probe_positive, root / "pos.jsonl")
    write_chat_jsonl(corpus.probe_negative, root / "neg.jsonl")
    tokenizer = train_bpe_tokenizer([f"{e.prompt} {e.response}" for e in corpus.train[:200]], root / "tok", vocab_size=400)
    save_model(build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=128), root / "model")
    (root / "run.toml").write_text(CONFIG)
    return root


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: offline, one torch thread (results are bitwise comparable only at
    the same thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore"}


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m concept_influence ARGS`` in ``cwd``."""
    done = subprocess.run([sys.executable, "-m", "concept_influence", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"concept-influence {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done
