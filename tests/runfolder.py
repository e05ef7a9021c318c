"""A small project on disk for run-folder tests: a saved tiny model, chat JSONL files and a TOML config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from concept_influence_benchmarks.memory import write_small_project

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
    write_small_project(root, {"train.jsonl": n_train}, n_probe=40, vocab_size=400, d_model=32)
    (root / "run.toml").write_text(CONFIG)
    return root


def run_reference(project: Path) -> Path:
    """One uninterrupted run of the project's config (in-process, progress off) in ``runs/reference``."""
    import torch

    from concept_influence.config import RunConfig
    from concept_influence.runs import run_config

    torch.set_num_threads(1)
    run_config(RunConfig.read(project / "run.toml"), project / "runs" / "reference", progress=False)
    return project / "runs" / "reference"


def in_memory_inputs(project: Path, run: Path):
    """``(adapter, train, concept)`` as the project's run makes them, in memory: its model, its tokenised training
    examples, and the concept on the direction of ``run``'s probe averaged over the first 24 positive texts."""
    from concept_influence.concepts import ConceptFunction
    from concept_influence.config import RunConfig
    from concept_influence.data import load_chat_jsonl, tokenize_examples
    from concept_influence.models import load_model
    from probes import ConceptDirection

    adapter = load_model(project / "model")
    cfg = RunConfig.read(project / "run.toml")
    train = tokenize_examples(load_chat_jsonl(cfg.data.train), adapter.tokenizer, cfg.data.max_length, True)
    eval_examples = tokenize_examples(load_chat_jsonl(cfg.concept_eval, 24), adapter.tokenizer, cfg.data.max_length, True)
    direction = ConceptDirection.load(run / "probe" / "direction.safetensors")
    return adapter, train, ConceptFunction.from_directions(direction, eval_examples)


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


def start_and_kill(args: list[str], cwd: Path, ready, timeout: float = 120) -> None:
    """Start the CLI, SIGKILL it as soon as ``ready()`` holds; fail if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "concept_influence", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before it could be killed:\n{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the first shard")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m concept_influence ARGS`` in ``cwd``; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "concept_influence", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done
