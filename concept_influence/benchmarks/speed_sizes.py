"""Speed at real model sizes: the cost per example of each stage on a randomly initialised model of a named shape.

No weights are needed to measure speed, so the model is a bias-free Llama-style causal LM with the shape of
GPT-2 small or Qwen2.5-0.5B (kronfluence 1.0.1 tracks ``nn.Linear`` modules with their biases and not GPT-2's
``Conv1D``, so a bias-free ``nn.Linear`` model is what both libraries can track identically). The data are random
token sequences (the first half prompt, the second half response) and the concepts random unit directions at
``blocks.{concept_layer}.hook_resid_post``; every weight matrix of blocks ``0..concept_layer`` is tracked.

Measured in one run, one stage after the other, each over the same examples and batch size:

* **floor** — one forward plus a backward to the activations only (no weight gradients): what any gradient-based
  attribution of every example has to pay;
* training step (forward, backward, AdamW), EK-FAC fit (both data passes and the eigendecompositions),
  Concept Influence scoring for K = 1 and K concepts at once, at full rank and with the low-rank query, the fast path
  (``probe_projection``), and kronfluence's EK-FAC scores of the same concept (same maps, sampled-label Fisher,
  damping 0.1 × mean eigenvalue per map, float32), with their Spearman correlation against ours.

Each stage also reports its FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one batch (matrix
products and attention; eigendecompositions are not counted), and its peak resident memory (Linux ``VmHWM`` reset
before the stage) with its rise over the memory before it.
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from probes import ConceptDirection

from ..concepts import ConceptFunction
from ..curvature import fit_curvature
from ..data import TokenizedExample, iter_batches
from ..estimators import ConceptInfluence, ProbeProjection
from ..fileio import atomic_write_text
from ..models import HFCausalLMAdapter, ModelAdapter, per_token_mean_loss
from ..provenance import machine_description
from ..scoring import ScoringSettings
from .bergson_bridge import bergson_concept_scores, bergson_unavailable
from .kronfluence_bridge import DAMPING_FACTOR, kronfluence_concept_scores
from .planted_config import BenchmarkError
from .smallmodel import train_model
from .speed_memory import measure_peak, run_child

__all__ = ["SIZES", "SizeConfig", "run_size_benchmark", "format_size_markdown"]

# Llama-style shapes (hidden, MLP, blocks, heads, key-value heads, vocabulary); "tiny" is for tests and smoke runs.
SIZES = {
    "gpt2-small": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=50257),
    "qwen-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


@dataclass
class SizeConfig:
    """What the size benchmark measures; the defaults are the committed GPT-2-small run on a 2-core CPU."""

    size: str = "gpt2-small"
    n_examples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    concept_layer: int = 3
    n_eval: int = 8
    many_concepts: int = 16
    query_rank: int = 8
    threads: int = 2
    seed: int = 0
    kronfluence: bool = True
    stages: tuple[str, ...] = field(default=())  # empty: all; the floor and the fit are always run
    rounds: int = 3  # runs of each compared K = 1 pipeline (ours, kronfluence, Bergson), in alternating order
    memory_examples: int = 16  # each compared stage again alone in a fresh process, on this many examples

    def __post_init__(self):
        if self.size not in SIZES:
            raise BenchmarkError(f"unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        for name in ("n_examples", "rounds"):
            if getattr(self, name) < 1:
                raise BenchmarkError(f"{name} must be at least 1, got {getattr(self, name)}")


def size_model(cfg: SizeConfig) -> HFCausalLMAdapter:
    """A randomly initialised bias-free Llama of the configured shape (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(**SIZES[cfg.size], max_position_embeddings=2 * cfg.seq_len, attention_bias=False,
                         mlp_bias=False, tie_word_embeddings=False)
    return HFCausalLMAdapter(LlamaForCausalLM(config).eval(), SimpleNamespace(pad_token_id=0))


def random_examples(n: int, cfg: SizeConfig, prefix: str, seed: int) -> list[TokenizedExample]:
    """``n`` random token sequences of ``seq_len`` tokens, the second half being the response."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SIZES[cfg.size]["vocab_size"], (n, cfg.seq_len), generator=gen)
    return [TokenizedExample(f"{prefix}:{i + 1}", tuple(row.tolist()), cfg.seq_len // 2) for i, row in enumerate(ids)]


def random_concept(adapter: ModelAdapter, cfg: SizeConfig, k: int, evals: Sequence[TokenizedExample]) -> ConceptFunction:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hook = f"blocks.{cfg.concept_layer}.hook_resid_post"
    directions = [ConceptDirection(torch.randn(adapter.d_model, generator=gen), hook, kind="custom",
                                   metadata={"name": f"concept_{j}"}) for j in range(k)]
    return ConceptFunction.from_directions(directions, eval_examples=evals)


def floor_pass(adapter: HFCausalLMAdapter, examples: Sequence[TokenizedExample], batch_size: int) -> None:
    """Forward plus a backward to the input embeddings only: no weight requires grad, so no weight gradient is formed."""
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
            # a non-leaf copy: torch's FLOP counter cannot differentiate with respect to a leaf tensor
            embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True) * 1.0
            logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).logits
            torch.autograd.grad(per_token_mean_loss(logits, batch).sum(), embeds)
    finally:
        for p in params:
            p.requires_grad_(True)


def _measure(run: Callable[[], object]) -> dict:
    """Seconds, peak RSS and its rise over the RSS before (MiB; absent without Linux /proc) of one call."""
    timed = {}

    def timed_run():
        start = time.perf_counter()
        value = run()
        timed["seconds"] = time.perf_counter() - start
        return value

    value, memory = measure_peak(timed_run)
    return {"seconds": timed["seconds"], **memory, "value": value}


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def _stages(cfg: SizeConfig, adapter: HFCausalLMAdapter, evals: list, work: Path, state: dict) -> dict[str, Callable]:
    """Each stage as ``examples -> value`` (run on all examples for the time, on one batch for the FLOP count);
    ``state`` receives the fitted curvature and the seconds each query took to compute."""
    bs = cfg.batch_size
    one, many = random_concept(adapter, cfg, 1, evals), random_concept(adapter, cfg, cfg.many_concepts, evals)

    def fit(examples):
        state["curvature"] = fit_curvature(adapter, examples, maps=cfg.concept_layer, strategy="ekfac", fisher="true",
                                           batch_size=bs, damping=None, damping_factor=DAMPING_FACTOR, seed=cfg.seed,
                                           progress=False)

    def score(concept, rank):
        estimators = {}

        def run(examples):  # the first call computes the preconditioned queries, timed apart
            if "estimator" not in estimators:
                estimators["estimator"] = ConceptInfluence(concept, state["curvature"],
                                                           scoring=ScoringSettings(batch_size=bs, query_rank=rank))
                start = time.perf_counter()
                estimators["estimator"].score(adapter, examples[:1], progress=False)
                state[f"query_seconds_{concept.k}_{rank}"] = time.perf_counter() - start
            return estimators["estimator"].score(adapter, examples, progress=False)
        return run

    def train_step(examples):
        if "clone" not in state:  # copied once, on the FLOP-count call before the timed one
            state["clone"] = copy.copy(adapter)
            state["clone"].model = copy.deepcopy(adapter.model)
        train_model(state["clone"], examples, 1, 1e-4, bs, tokens="response", seed=cfg.seed, progress=False)

    def kronfluence(concept):
        def run(examples):
            result = kronfluence_concept_scores(adapter, examples, concept, work / "kronfluence", bs, cfg.seed,
                                                ("aggregated",))
            return {**result, "score_seconds": result["score_seconds"]["aggregated"],
                    "scores": result["scores"]["aggregated"]}
        return run

    def bergson(concept):
        return lambda examples: bergson_concept_scores(adapter, examples, concept, work / "bergson", bs, cfg.seed,
                                                       DAMPING_FACTOR)

    stages = {
        "floor": lambda examples: floor_pass(adapter, examples, bs),
        "train_step": train_step,
        "ekfac_fit": fit,
        "concept_influence_k1": score(one, None),
        f"concept_influence_k{cfg.many_concepts}": score(many, None),
        "concept_influence_k1_lowrank": score(one, cfg.query_rank),
        f"concept_influence_k{cfg.many_concepts}_lowrank": score(many, cfg.query_rank),
        "probe_projection": lambda examples: ProbeProjection(one).score(adapter, examples, batch_size=bs, progress=False),
    }
    runners = {"kronfluence": kronfluence, "bergson": bergson}
    for concept in (one, many):
        for library in _libraries(cfg):
            stages[f"{library}_k{concept.k}"] = runners[library](concept)
    return {name: stages[name] for name in _selected(cfg, stages)}


def _libraries(cfg: SizeConfig) -> list[str]:
    """The libraries compared with ours: none unless asked for, Bergson only when it is installed."""
    if not cfg.kronfluence:
        return []
    return ["kronfluence"] + (["bergson"] if bergson_unavailable() is None else [])


def _compared(cfg: SizeConfig) -> list[tuple[str, ...]]:
    """Each compared K = 1 pipeline, as its stages: our fit and scoring, then each library's."""
    return [("ekfac_fit", "concept_influence_k1")] + [(f"{library}_k1",) for library in _libraries(cfg)]


def _selected(cfg: SizeConfig, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that ``cfg.stages`` asks for (all when empty), and always the floor and the fit: every ratio
    is to the floor, and scoring needs the fit."""
    return [name for name in names if not cfg.stages or name in cfg.stages or name in ("floor", "ekfac_fit")]


def memory_child(config: str, stage: str) -> None:
    """Child process: build the model and data of ``config`` (a SizeConfig as JSON), prepare what ``stage`` needs
    (the fit before scoring, the libraries' imports), reset the peak RSS, run the stage on the first
    ``memory_examples`` examples and print its peak RSS and the rise over the RSS before it (MiB, one JSON line)."""
    cfg = SizeConfig(**{**json.loads(config), "stages": ()})
    torch.set_num_threads(cfg.threads)
    adapter = size_model(cfg)
    train = random_examples(cfg.n_examples, cfg, "train", cfg.seed)[: cfg.memory_examples]
    evals = random_examples(cfg.n_eval, cfg, "eval", cfg.seed + 1)
    if stage == "kronfluence_k1":
        import kronfluence.analyzer  # noqa: F401  (its imports are not the stage's memory)
    with tempfile.TemporaryDirectory(prefix="concept-influence-size-memory-") as work:
        stages = _stages(cfg, adapter, evals, Path(work), {})
        if stage.startswith("concept_influence"):
            stages["ekfac_fit"](train)
        _, memory = measure_peak(lambda: stages[stage](train))
    print(json.dumps({"peak_mib": memory.get("peak_mib"), "rise_mib": memory.get("rise_mib")}))


def own_process_memory(cfg: SizeConfig, stages: Sequence[str]) -> dict[str, dict]:
    """Peak RSS and rise of each of ``stages``, each run alone in a fresh Python process (:func:`memory_child`): in one
    process, memory freed by an earlier stage and kept by the allocator hides part of a later stage's rise."""
    out = {}
    for stage in stages:
        print(f"[{cfg.size}] memory of {stage} in its own process ...", flush=True)
        code = (f"from concept_influence.benchmarks.speed_sizes import memory_child; "
                f"memory_child({json.dumps(asdict(cfg))!r}, {stage!r})")
        out[stage] = run_child(code, f"memory of {stage!r}")
    return out


def _repeat_compared(cfg: SizeConfig, stages: dict[str, Callable], results: dict[str, dict], train: list) -> None:
    """Run the compared pipelines (:func:`_compared`) ``cfg.rounds - 1`` more times, in reversed order every other
    round (the first run is the one already in ``results``), and make each one's ``seconds`` (and a library's
    ``fit_seconds`` and ``score_seconds``) the median over the runs, keeping every run's figures beside it."""
    groups = [group for group in _compared(cfg) if all(name in results for name in group)]
    runs = {name: [_timing(results[name])] for group in groups for name in group}
    for r in range(1, cfg.rounds):
        for group in groups[::-1] if r % 2 else groups:
            for name in group:
                print(f"run {r + 1} of {name} ...", flush=True)
                gc.collect()
                start = time.perf_counter()
                value = stages[name](train)
                runs[name].append(_timing({"seconds": time.perf_counter() - start, "value": value}))
    for name, timings in runs.items():
        for key in timings[0]:
            figures = [t[key] for t in timings]
            results[name].update({key: statistics.median(figures), f"all_{key}": figures})


def _timing(measured: dict) -> dict:
    """A stage run's seconds, with a library's fit and scoring seconds when it reports them."""
    value = measured.get("value")
    extra = {key: value[key] for key in ("fit_seconds", "score_seconds")} if isinstance(value, dict) else {}
    return {"seconds": measured["seconds"], **extra}


def run_size_benchmark(out_dir: str | Path, cfg: SizeConfig | None = None) -> dict:
    """Measure every stage at the configured size; write ``speed-{size}.json`` and ``speed-{size}.md`` to ``out_dir``."""
    from scipy.stats import spearmanr

    cfg = cfg or SizeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    machine = machine_description()
    started = time.perf_counter()
    # first, while this process holds no model: at qwen-0.5b size this process's model, factors and queries (about
    # 15 GB) beside a child ran a 24 GB machine out of memory
    alone = _selected(cfg, [name for group in _compared(cfg) for name in group])
    own = own_process_memory(cfg, alone) if cfg.memory_examples else {}
    adapter = size_model(cfg)
    train = random_examples(cfg.n_examples, cfg, "train", cfg.seed)
    evals = random_examples(cfg.n_eval, cfg, "eval", cfg.seed + 1)
    results: dict[str, dict] = {}
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="concept-influence-size-") as work:
        stages = _stages(cfg, adapter, evals, Path(work), state)
        for name, run in stages.items():
            print(f"[{cfg.size}] {name} ...", flush=True)
            if name.startswith("concept_influence"):
                run(train[:1])  # computes the preconditioned queries (a fixed cost per concept, reported apart)
            # FLOPs on one batch first: the timed run on every example then leaves the fitted curvature behind
            flops = _flops(lambda run=run: run(train[: cfg.batch_size])) / cfg.batch_size
            measured = _measure(lambda run=run: run(train))
            results[name] = {**measured, **_timing(measured), "flops_per_example": flops}
            state.pop("clone", None)  # the training step's model copy and optimiser state
        _repeat_compared(cfg, stages, results, train)
    for entry in results.values():
        entry["seconds_per_example"] = entry["seconds"] / len(train)
    for name, entry in results.items():
        if name.startswith("concept_influence"):
            k = int(name.removeprefix("concept_influence_k").removesuffix("_lowrank"))
            entry["query_seconds"] = state[f"query_seconds_{k}_{cfg.query_rank if 'lowrank' in name else None}"]
    values = {name: entry.pop("value") for name, entry in results.items()}
    for name, entry in results.items():
        full = values.get(name.removesuffix("_lowrank"))
        if name.endswith("_lowrank") and full is not None:  # the lowest over the K concepts
            entry["spearman_vs_full_rank"] = min(float(spearmanr(full.column(k), values[name].column(k)).statistic)
                                                 for k in range(len(full.columns)))
        library, _, k = name.rpartition("_k")
        if library in _LIBRARIES:  # the lowest over the K concepts
            ours = values[f"concept_influence_k{k}"]
            entry["spearman_vs_ours"] = min(float(spearmanr(ours.column(j), values[name]["scores"][:, j]).statistic)
                                            for j in range(int(k)))
    report = {"config": asdict(cfg), "machine": machine, "own_process_memory": own, "shape": SIZES[cfg.size],
              "parameters": sum(p.numel() for p in adapter.model.parameters()),
              "tracked_maps": len(adapter.linear_maps(cfg.concept_layer)), "stages": results,
              "bergson": bergson_unavailable() if cfg.kronfluence else "not asked for",
              "total_seconds": time.perf_counter() - started}
    atomic_write_text(out_dir / f"speed-{cfg.size}.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / f"speed-{cfg.size}.md", format_size_markdown(report))
    return report


_LABELS = {
    "floor": "**floor**: forward + backward to the activations only",
    "train_step": "training step (forward, backward, AdamW)",
    "ekfac_fit": "EK-FAC fit (2 passes + eigendecompositions)",
    "probe_projection": "probe_projection (forward to the concept's block)",
}
_LIBRARIES = {"kronfluence": "kronfluence 1.0.1, K = {k} (fit + {runs})",
              "bergson": "Bergson 2.5.1, K = {k} (label sampling + fit + score)"}


def _label(name: str, cfg: dict) -> str:
    if name in _LABELS:
        return _LABELS[name]
    library, _, k = name.rpartition("_k")
    if library in _LIBRARIES:
        return _LIBRARIES[library].format(k=k, runs="score" if k == "1" else f"{k} scoring runs")
    k = name.removeprefix("concept_influence_k").removesuffix("_lowrank")
    rank = f"query rank {cfg['query_rank']}" if name.endswith("_lowrank") else "full-rank query"
    return f"Concept Influence scoring, K = {k}, {rank}"


def format_size_markdown(report: dict) -> str:
    """The size benchmark as a markdown table with ratios to the floor."""
    cfg, st, m = report["config"], report["stages"], report["machine"]
    floor = st["floor"]
    command = f"concept-influence bench speed --size {cfg['size']} --out benchmarks"
    defaults = SizeConfig()
    command += "".join(f" --{flag} {cfg[key]}" for flag, key in (("examples", "n_examples"), ("rounds", "rounds"))
                       if cfg[key] != getattr(defaults, key)) + ("" if cfg["kronfluence"] else " --no-kronfluence")
    lines = [
        f"# Speed at {cfg['size']} size", "",
        f"Reproduce: `{command}` ({report['total_seconds']:.0f} s in all).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {cfg['threads']} threads, "
        f"kronfluence {m.get('kronfluence') or 'not installed'}, Bergson {m.get('bergson') or 'not installed'}; float32 on "
        "CPU.", "",
        f"Model: a randomly initialised bias-free Llama of {cfg['size']} shape ({report['parameters'] / 1e6:.0f} M parameters: "
        + ", ".join(f"{k} {v}" for k, v in report["shape"].items()) + f"). {cfg['n_examples']} random sequences of "
        f"{cfg['seq_len']} tokens (response: the second half), batch size {cfg['batch_size']}; concepts: random directions "
        f"at `blocks.{cfg['concept_layer']}.hook_resid_post`, {report['tracked_maps']} tracked weight matrices (blocks "
        f"0..{cfg['concept_layer']}), {cfg['n_eval']} evaluation examples. Each stage once, in this order"
        + (f", then the compared K = 1 pipelines (our fit and scoring, kronfluence's, Bergson's; marked †) "
           f"{cfg['rounds'] - 1} more times in alternating order, their median reported" if cfg["rounds"] > 1 else "")
        + "; FLOPs counted by "
        "torch's FlopCounterMode on one batch (matrix products and attention, not eigendecompositions); peak RSS with "
        "VmHWM reset before the stage, and its rise over the RSS before it. The peak is the whole process's, with what "
        "earlier stages left behind (model copies, factors); compare stages by the rise.", "",
        "Concept Influence rows are per-example scoring with the preconditioned queries already computed; computing them "
        "(K backward passes over the evaluation examples, the preconditioning and the SVD of the low-rank query) is a "
        "fixed cost per concept set, in its own column.", "",
        "| stage | s / example | × floor | GFLOP / example | FLOP × floor | peak RSS (MiB) | rise (MiB) | Spearman | "
        "queries (s, once) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in st.items():
        rho = entry.get("spearman_vs_full_rank", entry.get("spearman_vs_ours"))
        rho = "" if rho is None else (f"{rho:.4f} vs ours" if "spearman_vs_ours" in entry else f"{rho:.4f} vs full rank")
        memory = (f"{entry['peak_mib']:.0f} | {entry['rise_mib']:.0f}" if "peak_mib" in entry else "n/a | n/a")
        queries = f"{entry['query_seconds']:.1f}" if "query_seconds" in entry else ""
        mark = " †" if len(entry.get("all_seconds", ())) > 1 else ""
        lines.append(f"| {_label(name, cfg)}{mark} | {entry['seconds_per_example']:.3f} | "
                     f"{entry['seconds_per_example'] / floor['seconds_per_example']:.2f} | "
                     f"{entry['flops_per_example'] / 1e9:.1f} | {entry['flops_per_example'] / floor['flops_per_example']:.2f} | "
                     f"{memory} | {rho} | {queries} |")
    own = report.get("own_process_memory") or {}
    if own:
        lines += ["", f"Peak memory of each compared stage alone in a fresh process (model and data loaded, the libraries "
                  f"imported, and for scoring the factors fitted, before the peak is reset), on {cfg['memory_examples']} "
                  "examples:", "", "| stage | peak RSS (MiB) | rise (MiB) |", "| --- | ---: | ---: |"]
        lines += [f"| {_label(name, cfg)} | {m['peak_mib']:.0f} | {m['rise_mib']:.0f} |" for name, m in own.items()
                  if m.get("peak_mib") is not None]
    lines += _comparison_lines(st, cfg["many_concepts"])
    if report.get("bergson") and "bergson_k1" not in st:
        lines += ["", f"Bergson: not run: {report['bergson']}."]
    return "\n".join(lines) + "\n"


def _comparison_lines(st: dict, many: int) -> list[str]:
    """Each library against ours in seconds: at K = 1 the medians (with every run), fit and scoring with its query;
    at K = ``many`` the scoring with its queries (the fit does not depend on K)."""
    if "concept_influence_k1" not in st:
        return []
    lines = []
    ours_fit, ours_score, ours_query = (st["ekfac_fit"]["seconds"], st["concept_influence_k1"]["seconds"],
                                        st["concept_influence_k1"]["query_seconds"])
    ours_total = ours_fit + ours_score + ours_query
    for library, label in (("kronfluence", "kronfluence"), ("bergson", "Bergson")):
        other = st.get(f"{library}_k1")
        if other is None:
            continue
        runs = ", ".join(f"{x:.1f}" for x in other.get("all_seconds", [other["seconds"]]))
        ours_runs = ", ".join(f"{f + s + ours_query:.1f}" for f, s in
                              zip(st["ekfac_fit"].get("all_seconds", [ours_fit]),
                                  st["concept_influence_k1"].get("all_seconds", [ours_score])))
        lines += ["", f"{label}, K = 1: fit {other['fit_seconds']:.1f} s and score {other['score_seconds']:.1f} s (its "
                  f"query included), {other['seconds']:.1f} s in all (runs: {runs}), against ours {ours_fit:.1f} s, "
                  f"{ours_score:.1f} s and {ours_query:.1f} s for the query, {ours_total:.1f} s in all (runs: "
                  f"{ours_runs}). {label} / ours: fit {other['fit_seconds'] / ours_fit:.2f}×, scoring with its query "
                  f"{other['score_seconds'] / (ours_score + ours_query):.2f}×, in all {other['seconds'] / ours_total:.2f}×."]
        other_many, ours_many = st.get(f"{library}_k{many}"), st.get(f"concept_influence_k{many}")
        if other_many is not None and ours_many is not None:
            ours_scoring = ours_many["seconds"] + ours_many["query_seconds"]
            lines += ["", f"{label}, K = {many}: fit {other_many['fit_seconds']:.1f} s and score "
                      f"{other_many['score_seconds']:.1f} s (its queries included), against ours {ours_many['seconds']:.1f} s "
                      f"and {ours_many['query_seconds']:.1f} s for the queries ({label} / ours, scoring with its queries: "
                      f"{other_many['score_seconds'] / ours_scoring:.2f}×)."]
    return lines
