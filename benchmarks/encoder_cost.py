"""The row encoder's cost at GPT-2-small shape (issue 28, "encoder: forward-only cost <= 0.2x the gradient floor per
example"): per example, on one thread, as multiples of the gradient floor (a forward and a backward to the
activations only), the encoder's forward-only pass reading the index's maps of blocks 0..L for several L, a plain
forward stopped after block L (what the encoder adds to it is its own arithmetic), the fast path (probe projection:
a forward to the concept's block) and exact Concept Influence scoring (K = 1, its query computed beforehand).

The setting is the index benchmark's at a real shape (``concept_influence_benchmarks.index_bench.exact_at_shape``): a
randomly initialised bias-free Llama of GPT-2-small's shape (12 blocks, d_model 768, vocabulary 50,257) through the
repository's Hugging Face adapter, random sequences (the second half the response), EK-FAC on the maps of blocks
0..concept (default 6 of 12: a concept in a middle block), the default index over those maps, encoders with m = 64
fitted on it. Passes run interleaved, the median of the repeats; FLOPs are torch's counter on one batch. Usage, from
the repository root (23 minutes on one thread, 7.5 of them the EK-FAC fit):

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/encoder_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from concept_influence.data import iter_batches  # noqa: E402
from concept_influence.encoder import RowEncoder  # noqa: E402
from concept_influence.estimators import ProbeProjection  # noqa: E402
from concept_influence.index import GradientIndex, IndexSettings  # noqa: E402
from concept_influence.provenance import machine_description  # noqa: E402
from concept_influence_benchmarks.index_bench import IndexBenchConfig, exact_at_shape  # noqa: E402
from concept_influence_benchmarks.pass_costs import floor, interleaved_costs  # noqa: E402

GOAL = 0.2
QUICK = dict(size="tiny", examples=24, seq_len=32, concept_block=1, blocks="1,0", m=8, budget=4096, repeats=2)


def _log(text: str) -> None:
    print(f"[encoder cost] {text}", file=sys.stderr, flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2-small", help="a shape of concept_influence_benchmarks.speed_size_stages")
    p.add_argument("--examples", type=int, default=72, help="examples indexed, encoded and timed")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (the second half the response)")
    p.add_argument("--concept-block", type=int, default=6, help="the concept's block; the index holds blocks 0..it")
    p.add_argument("--blocks", default="6,3,0", help="the encoders' last blocks read (comma-separated)")
    p.add_argument("--m", type=int, default=64, help="the code's length")
    p.add_argument("--budget", type=int, default=65536, help="the index's bytes per example (its default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/encoder-cost.md", help="the report; the .json beside it")
    p.add_argument("--report-only", action="store_true", help="write the report again from the .json beside it")
    p.add_argument("--quick", action="store_true", help="a tiny model and few examples (tests): " + str(QUICK))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.blocks = sorted({int(b) for b in str(args.blocks).split(",")}, reverse=True)
    return args


def _forward_to(adapter, block: int, batch_size: int):
    """A plain forward stopped after ``block``, nothing kept: the forward that an encoder reading blocks 0..block runs."""
    @torch.no_grad()
    def run(examples):
        for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
            adapter.activations(batch, f"blocks.{block}.hook_resid_post")
    return run


def measure(args: argparse.Namespace) -> dict:
    """Build the setting, fit the index and the encoders, time every pass; the results (JSON-ready)."""
    torch.set_num_threads(args.threads)
    cfg = IndexBenchConfig(size=args.size, n_examples=args.examples, seq_len=args.seq_len,
                           concept_layer=args.concept_block, n_concepts=1, budget=args.budget, bergson=False)
    setting = exact_at_shape(cfg, influence_function=False)
    adapter, train, bs = setting.adapter, setting.train, args.batch_size
    exact = setting.queries["concept_influence"]
    facts = {k: v for k, v in setting.facts.items() if not k.startswith("all_")}
    passes, fits = {"floor": lambda ex: floor(adapter, ex, bs)}, {}
    with tempfile.TemporaryDirectory(prefix="encoder-cost-") as work:
        _log(f"index of {len(train)} examples, blocks 0..{args.concept_block} ...")
        t0 = time.perf_counter()
        index = GradientIndex.build(Path(work) / "index", adapter, train, setting.curvature,
                                    IndexSettings(budget=args.budget), batch_size=bs, progress=False)
        facts.update(index_build_seconds=time.perf_counter() - t0, index_bytes=index.bytes_per_example)
        for block in args.blocks:
            _log(f"encoder reading blocks 0..{block}, m = {args.m} ...")
            t0 = time.perf_counter()
            encoder = RowEncoder.fit(index, adapter, train, m=args.m, sample=len(train), last_block=block,
                                     batch_size=bs, progress=False)
            fits[block] = {"seconds": time.perf_counter() - t0, "features": int(encoder.tensors["coef"].shape[0])}
            passes[f"encode, blocks 0..{block}"] = lambda ex, e=encoder: e.encode(adapter, ex, batch_size=bs,
                                                                                  progress=False)
            passes[f"forward to block {block}"] = _forward_to(adapter, block, bs)
        facts["code_bytes"] = encoder.m * 2
        passes["fast path"] = lambda ex: ProbeProjection(exact.concept).score(adapter, ex, batch_size=bs, progress=False)
        passes["exact Concept Influence"] = lambda ex: exact.score(adapter, ex, progress=False)
        _log(f"{len(passes)} passes, {args.repeats} interleaved rounds over {len(train)} examples ...")
        costs = interleaved_costs(passes, train, args.repeats, train[:bs], _log)
    return {"config": {k: v for k, v in vars(args).items() if k != "out"}, "facts": facts, "encoder_fits": fits,
            "costs": costs}


def _label(name: str, args) -> str:
    if name.startswith("encode, blocks 0..") and int(name.rsplit(".", 1)[1]) == args["concept_block"]:
        return f"{name} (every indexed block)"
    if name == "encode, blocks 0..0":
        return "encode, block 0 only"
    if name == "fast path":
        return f"fast path (forward to the concept's block {args['concept_block']})"
    return name


def report(results: dict) -> str:
    """The results as markdown: the table of passes against the floor, then what the encoder itself adds."""
    c, cfg, facts, m = results["costs"], results["config"], results["facts"], results["machine"]
    fl = c["floor"]
    lines = [f"# The row encoder's cost at {cfg['size']} shape (issue 28)", "",
             f"Command: `{results['command']}` ({results['seconds']:.0f} s wall on {m['cpu']}, torch threads "
             f"{m['torch_threads']}, load average at start {m['load_average_start'][0]:.1f}).", "",
             f"A randomly initialised {cfg['size']}-shaped model ({facts['parameters'] / 1e6:.1f} M parameters, "
             f"through the Hugging Face adapter), {cfg['examples']} random examples of {cfg['seq_len']} tokens (the "
             f"second half the response), batch {cfg['batch_size']}; the concept at block {cfg['concept_block']}, EK-FAC "
             f"and the index ({facts['index_bytes']:,} bytes per example) over the {facts['tracked_maps']} maps of "
             f"blocks 0..{cfg['concept_block']}; encoders with m = {cfg['m']} ({facts['code_bytes']} bytes per example) "
             f"fitted on all {cfg['examples']} rows. Per example; time: the median of {cfg['repeats']} interleaved "
             "rounds (each round's ratio in brackets); FLOPs: torch's counter on one batch. The floor is a forward and "
             "a backward to the activations only (no weight gradient). Exact Concept Influence excludes its query "
             "(computed once per concept).", "",
             f"| pass (per example, one thread) | ms | × floor, time (per round) | GFLOP | × floor, FLOPs | ≤ {GOAL}× floor |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in c.items():
        t, f = row["seconds"] / fl["seconds"], row["flops"] / fl["flops"]
        rounds = ", ".join(f"{a / b:.3f}" for a, b in zip(row["runs"], fl["runs"]))
        goal = "—" if name == "floor" else "yes" if max(t, f) <= GOAL else "FLOPs only" if f <= GOAL else \
            "time only" if t <= GOAL else "no"
        lines.append(f"| {_label(name, cfg)} | {row['seconds'] * 1e3:.1f} | **{t:.3f}** ({rounds}) | {row['flops'] / 1e9:.2f} "
                     f"| **{f:.3f}** | {goal} |")
    lines += ["", f"Index build (one run, not interleaved): {facts['index_build_seconds'] / cfg['examples'] * 1e3:.0f} ms "
              f"per example, {facts['index_build_seconds'] / cfg['examples'] / fl['seconds']:.2f}× the floor. EK-FAC fit: "
              f"{facts['fit_seconds']:.0f} s. The speed benchmark times the same floor "
              "(`concept_influence_benchmarks.pass_costs.floor`).", "",
              "What the encoder adds to the forward it stops (encode − forward to the same block; its captures, "
              "projections, pooling and code):", ""]
    for block, fit in results["encoder_fits"].items():
        enc, fwd = c[f"encode, blocks 0..{block}"], c[f"forward to block {block}"]
        lines.append(f"- blocks 0..{block}: {(enc['seconds'] - fwd['seconds']) / fl['seconds']:+.3f}× the floor in time, "
                     f"{(enc['flops'] - fwd['flops']) / fl['flops']:+.3f}× in FLOPs ({fit['features']:,} features; fit "
                     f"{fit['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """Measure, write the report and the .json beside it, print the report; the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:
        results = json.loads(out.with_suffix(".json").read_text())
        out.write_text(report(results))
        return results
    started = time.perf_counter()
    machine = machine_description()
    results = measure(args)
    command = " ".join(["flock /tmp/heavy.lock env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/encoder_cost.py",
                        *argv])
    results = {"command": command, "machine": {**machine, "torch_threads": torch.get_num_threads()},
               "seconds": time.perf_counter() - started, **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.write_text(report(results))
    print(report(results), end="")
    return results


if __name__ == "__main__":
    main()
