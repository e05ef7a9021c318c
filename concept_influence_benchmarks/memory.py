"""Bounded memory: peak RSS of the `score` stage of a run folder on 1k and 50k examples, in one run.

Both runs share a small saved model, a probe trained on the embedded corpus and the same factors (fitted on
the first 1,000 examples). Each stage runs as its own ``python -m concept_influence`` process, and its peak
resident set size is read from the kernel (``wait4`` rusage), so the figure includes the interpreter,
torch and the model: what a user's process would need.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from concept_influence.data import write_chat_jsonl
from concept_influence.fileio import atomic_write_text
from concept_influence.models import save_model
from concept_influence.provenance import machine_description
from concept_influence.toy.demo_corpus import make_demo_corpus
from concept_influence.toy.small_model import build_small_model, train_bpe_tokenizer

__all__ = ["run_memory_benchmark", "write_small_project"]

CONFIG = """
[model]
path = "model"

[data]
train = "{train}"
max_length = 128

[probe]
hook = "blocks.0.hook_resid_post"
positive = "pos.jsonl"
negative = "neg.jsonl"
kind = "diff_means"

[concept]
max_examples = 64

[factors]
max_examples = 1000
shard_size = 500

[scoring]
estimator = "{estimator}"
shard_size = 1000
batch_size = 16
"""


def _stage(args: list[str], cwd: Path, threads: int) -> dict:
    """Run one CLI command in a fresh process; its wall time and peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "concept_influence", *args, "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"concept-influence {' '.join(args)} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def write_small_project(root: Path, train_files: dict[str, int], *, n_probe: int, vocab_size: int, d_model: int,
                        seed: int = 0) -> None:
    """Write a small run-folder project under ``root``: each ``train_files`` name holds the first n examples of the
    embedded corpus, ``pos.jsonl``/``neg.jsonl`` its ``n_probe`` paired probe answers, and ``model/`` a randomly
    initialised 2-block TransformerLens model with a byte-level BPE tokenizer (n_ctx 128)."""
    corpus = make_demo_corpus(n_train=max(train_files.values()), n_probe=n_probe, seed=seed)
    for name, n in train_files.items():
        write_chat_jsonl(corpus.train[:n], root / name)
    write_chat_jsonl(corpus.probe_positive, root / "pos.jsonl")
    write_chat_jsonl(corpus.probe_negative, root / "neg.jsonl")
    tokenizer = train_bpe_tokenizer([f"{e.prompt} {e.response}" for e in corpus.train[:2000]], root / "tokenizer",
                                    vocab_size=vocab_size)
    save_model(build_small_model(tokenizer, n_layers=2, d_model=d_model, n_heads=4, n_ctx=128, seed=seed),
               root / "model")


def run_memory_benchmark(out_dir: str | Path, sizes: tuple[int, ...] = (1000, 50000), threads: int = 1,
                         estimators: tuple[str, ...] = ("concept_influence", "probe_projection"), seed: int = 0,
                         work: str | Path | None = None) -> dict:
    """Score ``sizes`` examples with each estimator; write ``memory.json`` and ``memory.md`` to ``out_dir``.
    The model, data and run folders go to ``work`` (default: a temporary folder), removed at the end."""
    import tempfile

    out_dir = Path(out_dir)
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="concept-influence-memory-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_small_project(work, {f"train_{n}.jsonl": n for n in sizes}, n_probe=200, vocab_size=1024, d_model=64,
                        seed=seed)
    machine = machine_description()
    rows = []
    for estimator in estimators:
        for n in sizes:
            name = f"{estimator}-{n}"
            (work / f"{name}.toml").write_text(CONFIG.format(train=f"train_{n}.jsonl", estimator=estimator))
            prep = [("probe", "train", name, "--config", f"{name}.toml")]
            if estimator == "concept_influence":
                prep.append(("fit-factors", name))
            for args in prep:
                _stage(list(args), work, threads)
            score = _stage(["score", name], work, threads)
            rows.append({"estimator": estimator, "examples": n, **score, "examples_per_s": n / score["seconds"]})
            print(f"{name}: {score['peak_rss_mib']:.0f} MiB peak, {score['seconds']:.0f} s", flush=True)
    ratios = {}
    for estimator in estimators:
        small, large = (next(r for r in rows if r["estimator"] == estimator and r["examples"] == n)
                        for n in (min(sizes), max(sizes)))
        ratios[estimator] = large["peak_rss_mib"] / small["peak_rss_mib"]
    result = {"machine": machine, "threads": threads, "sizes": list(sizes), "rows": rows, "peak_ratio": ratios,
              "command": f"concept-influence bench memory --out {out_dir}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "memory.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "memory.md", _markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def _markdown(result: dict) -> str:
    m = result["machine"]
    small, large = min(result["sizes"]), max(result["sizes"])
    lines = [f"# Peak memory of scoring: {small:,} vs {large:,} examples", "",
             f"`{result['command']}`; {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} on "
             f"{result['threads']} thread(s). Each `score` stage runs in its own process; peak RSS is the kernel's "
             "(interpreter, torch and model included). Model: TransformerLens, 2 blocks, d_model 64; concept at "
             "block 0; shards of 1,000 examples; EK-FAC factors fitted on the first 1,000 examples.", "",
             "| estimator | examples | peak RSS (MiB) | seconds | examples/s |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['estimator']} | {r['examples']:,} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | "
                     f"{r['examples_per_s']:.0f} |")
    lines += ["", "Peak RSS, largest over smallest (goal: within 10 %, i.e. ≤ 1.10):", ""]
    for estimator, ratio in result["peak_ratio"].items():
        lines.append(f"- {estimator}: {ratio:.3f} ({'met' if ratio <= 1.10 else 'missed'})")
    return "\n".join(lines) + "\n"
