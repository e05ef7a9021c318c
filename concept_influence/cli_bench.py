"""``concept-influence bench planted|medical|speed|memory|gpu-check|block-width``: the benchmarks from the command line (``bench
check-table`` and ``query-table`` are in :mod:`.cli_concept`). The planted benchmarks train a small model, or with
``--model DIR`` fine-tune LoRA adapters on the user's Hugging Face model."""

from __future__ import annotations

import argparse

from .cli_common import EM_DATA, add_dtype_option, needs_benchmarks
from .cli_concept import add_query_options, query_overrides
from .cli_sae import add_sae_benchmark_options, sae_benchmark_overrides

__all__ = ["add_bench_commands"]

PLANTED_SIZES = ("n_probe", "n_pretrain", "n_pool", "n_eval", "n_seeds", "n_layers", "d_model", "max_length", "layer",
                 "finetune_epochs", "pretrain_epochs", "finetune_lr")
SMALL_MODEL = ("n_pretrain", "n_layers", "d_model", "pretrain_epochs")  # describe the model trained here, not --model's


def _planted_config(args: argparse.Namespace, paired: bool):
    from .planted import BenchmarkError, PlantedConfig

    overrides = {k: getattr(args, k) for k in PLANTED_SIZES if getattr(args, k) is not None}
    if args.model is not None:
        given = [f"--{k.replace('_', '-')}" for k in SMALL_MODEL if k in overrides]
        if given:
            raise BenchmarkError(f"{', '.join(given)} describe the small model trained here; with --model there is "
                                 "no pre-training and the model's own shape is used")
        overrides.update(model=args.model, lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets or ()),
                         dtype=args.dtype, device=args.device)
    try:
        fractions = tuple(float(f) for f in args.remove_fractions.split(","))
    except ValueError:
        raise BenchmarkError(f"--remove-fractions must be numbers separated by commas, got {args.remove_fractions!r}")
    overrides.update(rate=args.rate, paired=paired, seed=args.seed, lds=args.lds, remove_fractions=fractions)
    overrides.update(sae_benchmark_overrides(args))
    overrides.update(query_overrides(args))
    return PlantedConfig.quick(**overrides) if args.quick else PlantedConfig(**overrides)


def _run_planted(args: argparse.Namespace, clean, planted, paired: bool, names: tuple[str, str]) -> int:
    from .data import load_chats
    from .planted import command_line, run_planted

    cfg = _planted_config(args, paired)
    run_planted(load_chats(clean), load_chats(planted), args.out, cfg, progress=not args.no_progress,
                command=command_line(), data_names=names)
    return 0


def _bench_planted(args: argparse.Namespace) -> int:
    return _run_planted(args, args.clean, args.planted, args.paired, (args.clean, args.planted))


def _bench_medical(args: argparse.Namespace) -> int:
    from .planted.splits import medical_files

    files = medical_files(args.data)
    return _run_planted(args, *files, paired=True, names=tuple(f.name for f in files))


def _add_planted_options(p: argparse.ArgumentParser, default_rate: float | None) -> None:
    p.add_argument("--rate", type=float, default=default_rate, required=default_rate is None,
                   help="share of the training pool that gets the planted answer, in (0, 0.5]"
                        + (f" (default {default_rate})" if default_rate else ""))
    p.add_argument("--out", required=True, help="output folder: results.json, results.md, plots, scores, probe, tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed for the splits, model, training and sampling (default 0)")
    p.add_argument("--quick", action="store_true", help="a reduced size for tests (under a minute)")
    p.add_argument("--lds", type=int, default=0, metavar="M",
                   help="concept-LDS: fine-tune on M random subsets of the pool (--lds-fraction; default 0: skip)")
    p.add_argument("--remove-fractions", default="0.1", metavar="F[,F...]",
                   help="fractions of the pool removed from the top of each ranking before retraining (default 0.1)")
    p.add_argument("--n-seeds", type=int, help="fine-tuning seeds per behaviour measurement (default 3)")
    p.add_argument("--n-pool", type=int, help="training-pool size (default 1200)")
    p.add_argument("--n-pretrain", type=int, help="pre-training prompts, clean answers only (default 2500)")
    p.add_argument("--n-probe", type=int, help="probe prompts per class (default 400)")
    p.add_argument("--n-eval", type=int, help="evaluation prompts (default 200)")
    p.add_argument("--n-layers", type=int, help="blocks of the small model (default 2)")
    p.add_argument("--d-model", type=int, help="width of the small model (default 128)")
    p.add_argument("--max-length", type=int, help="tokens per example; longer responses are dropped (default 256)")
    p.add_argument("--layer", type=int, help="block of the probe (default: the last block)")
    p.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default 2)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 2)")
    p.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate, AdamW (default 1e-3; LoRA: try 2e-4)")
    p.add_argument("--model", metavar="DIR",
                   help="a Hugging Face causal LM folder (save_pretrained, safetensors): instead of training a small "
                        "model, every fine-tune (clean, planted, each filter-and-retrain) trains LoRA adapters on it")
    p.add_argument("--lora-rank", type=int, default=8, help="with --model: the LoRA rank (default 8; alpha = 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", metavar="MODULE",
                   help="with --model: module names to adapt, e.g. q_proj v_proj (default: every linear map of the "
                        "blocks)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="with --model: where it runs (default cpu)")
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_query_options(p)
    add_sae_benchmark_options(p)


@needs_benchmarks
def _bench_speed(args: argparse.Namespace) -> int:
    if args.size:
        from concept_influence_benchmarks.speed_sizes import SizeConfig, run_size_benchmark

        given = {key: value for key, value in (("n_examples", args.examples), ("rounds", args.rounds)) if value is not None}
        run_size_benchmark(args.out, SizeConfig(size=args.size, seed=args.seed, kronfluence=not args.no_kronfluence,
                                                **given))
        return 0
    from concept_influence_benchmarks.speed import run_speed_benchmark

    run_speed_benchmark(args.out, quick=args.quick, seed=args.seed, kronfluence=not args.no_kronfluence)
    return 0


@needs_benchmarks
def _bench_memory(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.memory import run_memory_benchmark

    sizes = (200, 1000) if args.quick else (1000, 50000)
    run_memory_benchmark(args.out, sizes=sizes, threads=args.threads, seed=args.seed)
    return 0


@needs_benchmarks
def _bench_gpu_check(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.scale_check import run_scale_check
    from concept_influence_benchmarks.scale_model import ScaleConfig

    from .plan import parse_bytes
    from .planted import command_line

    given = {k: getattr(args, k) for k in ("examples", "fit_examples", "seq_len", "batch_size", "concept_layer", "blocks",
                                           "time_budget")}
    cfg = ScaleConfig(size=args.size, device=args.device, dtype=args.dtype, fisher=args.fisher, seed=args.seed,
                      device_memory=parse_bytes(args.device_memory), compare=not args.no_compare,
                      peak_tolerance=args.peak_tolerance, **given)
    result = run_scale_check(cfg, args.out, log=not args.quiet, command=command_line())
    for check in result["checks"]:
        status = "ok" if check["passed"] else "FAILED" if check["enforced"] else "missed (not enforced)"
        print(f"{status}: {check['name']}: {check['detail']}")
    return 0 if result["passed"] else 1


@needs_benchmarks
def _bench_block_width(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.block_width import run_block_width

    results = run_block_width(args.out, args.widths.split(","), args.weights.split(","), args.memory, args.force)
    for key, r in results.items():
        if "peak_ratio" in r:
            print(f"{key}: measured peak / planned {r['peak_ratio']:.2f}")
    return 0


def _add_block_width(bench) -> None:
    p = bench.add_parser(
        "block-width", help="one Qwen2.5-7B-width block on the CPU, planned and measured per stage (fresh processes)",
        description="For each width and each of LoRA r = 16 and the full weights, in a fresh process: plan a one-block "
                    "Qwen2 model for --memory of host memory, fit EK-FAC in the plan's partitions (factors per map on "
                    "disk), precondition a random concept and score random-token examples; each stage's time and peak "
                    "RSS beside the plan's bytes. Writes DIR/block-width.json and .md; configurations already in the "
                    "JSON are kept (run again to resume).")
    p.add_argument("--out", default="benchmarks", help="output folder (default benchmarks)")
    p.add_argument("--widths", default="1/8,1/2,1", help="widths of Qwen2.5-7B's, of 1/64, 1/8, 1/2, 1 (default "
                                                          "1/8,1/2,1; 1 has three 18944² eigendecompositions)")
    p.add_argument("--weights", default="lora,full", help="lora, full or both (default)")
    p.add_argument("--memory", default="17GiB", help="host memory each plan is made for (default 17GiB)")
    p.add_argument("--force", action="store_true", help="measure configurations already in the JSON again")
    p.set_defaults(func=_bench_block_width)


def _add_gpu_check(bench) -> None:
    p = bench.add_parser(
        "gpu-check", help="Concept Influence at Qwen2.5-7B shape (LoRA r = 16), planned, run and measured per stage",
        description="Build a Qwen2.5-7B-shape model with random bfloat16 weights and LoRA r = 16 on its 7 linear maps "
                    "on the meta device, plan its memory for the device, give it its weights on the device, fit EK-FAC "
                    "in the plan's partitions, precondition a random concept's gradient and score random-token "
                    "examples; print each stage's time and peak memory beside the plan's, compare the low-precision "
                    "scores with float32 on the CPU at reduced widths, write DIR/gpu-check.json and .md "
                    "(gpu-check-SIZE-DEVICE for other sizes or devices). Exit status 1 when a check fails. `make "
                    "gpu-check` runs it on CUDA; --size tiny --device cpu is the same code at a tiny size.")
    p.add_argument("--size", choices=("qwen2.5-7b", "tiny"), default="qwen2.5-7b", help="preset (default qwen2.5-7b)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the model runs (default cuda)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="the model's dtype, compared with float32 on the CPU (default bfloat16)")
    p.add_argument("--out", default="benchmarks", help="output folder (default benchmarks)")
    p.add_argument("--examples", type=int, help="random-token examples scored (preset: 256 at qwen2.5-7b)")
    p.add_argument("--fit-examples", type=int, help="the first N of them fit EK-FAC (preset: 64)")
    p.add_argument("--seq-len", type=int, help="tokens per example, the second half the response (preset: 512)")
    p.add_argument("--batch-size", type=int, help="examples per forward/backward (preset: 8)")
    p.add_argument("--concept-layer", type=int, help="block whose residual stream the concept reads (default: the middle)")
    p.add_argument("--blocks", metavar="RANGES", help="blocks whose LoRA factors are tracked, e.g. 10-14 (preset: the "
                                                      "concept's block and the two before it; all at tiny)")
    p.add_argument("--device-memory", metavar="SIZE", help="plan for this much device memory, e.g. 40GB (default: the "
                                                            "CUDA device's own; no limit on the CPU)")
    p.add_argument("--fisher", choices=("true", "empirical"), default="true", help="Fisher of the fit (default true; "
                                                                                   "the comparison uses empirical)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data and concept (default 0)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="fail when the check takes longer (preset: 480 "
                                                                        "at qwen2.5-7b, none at tiny)")
    p.add_argument("--peak-tolerance", type=float, default=0.15, help="largest |measured / planned - 1| of the peak on "
                                                                      "CUDA (default 0.15)")
    p.add_argument("--no-compare", action="store_true", help="skip the low-precision comparisons")
    p.add_argument("--quiet", action="store_true", help="print only the checks")
    p.set_defaults(func=_bench_gpu_check)


def add_bench_commands(sub) -> argparse._SubParsersAction:
    """Add ``bench planted``, ``medical``, ``speed``, ``memory``, ``gpu-check`` and ``block-width``; returns the
    ``bench`` subparsers."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    planted = bench.add_parser(
        "planted", help="planted-data benchmark over any two chat JSONL files",
        description="Split two chat JSONL files (.jsonl or .jsonl.gz) by prompt into probe, pre-training, pool and "
                    "evaluation sets; pre-train a small TransformerLens model on clean text (or, with --model DIR, "
                    "take that Hugging Face model as it is); fine-tune it on the pool (with --model: LoRA) with a share "
                    "RATE of planted answers; train a probe; rank the pool with every estimator; measure the behaviour "
                    "of clean and planted fine-tunes and after removing the top of each ranking.")
    planted.add_argument("--clean", required=True, help="chat JSONL with the clean answers")
    planted.add_argument("--planted", required=True, help="chat JSONL with the planted-style answers")
    planted.add_argument("--paired", action="store_true",
                         help="line i of both files answers the same prompt (split by prompt; behaviour = log-prob gap)")
    _add_planted_options(planted, None)
    planted.set_defaults(func=_bench_planted)
    medical = bench.add_parser(
        "medical", help="the planted benchmark on the emergent-misalignment good/bad medical advice (paired)",
        description="bench planted with --paired on DATA/good_medical_advice.jsonl.gz (clean) and "
                    "DATA/bad_medical_advice.jsonl.gz (planted), read in place.")
    medical.add_argument("--data", default=EM_DATA, help=f"folder with the two files (default {EM_DATA})")
    _add_planted_options(medical, 0.1)
    medical.set_defaults(func=_bench_medical)

    speed = bench.add_parser("speed", help="cost per example of each estimator, factor fitting, memory, kronfluence, "
                                           "Bergson",
                             description="Measure in one run: tokens/s of a training step, of concept_influence "
                                         "scoring and of probe_projection; EK-FAC fitting time; peak memory; and "
                                         "scores and time against kronfluence and Bergson (both installed by `make "
                                         "install`). Writes DIR/speed.json and DIR/speed.md.")
    speed.add_argument("--out", required=True, help="output folder for speed.json and speed.md")
    speed.add_argument("--quick", action="store_true", help="a reduced size (about a minute)")
    speed.add_argument("--seed", type=int, default=0, help="seed for data, model and sampling (default 0)")
    speed.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence and Bergson comparison")
    speed.add_argument("--size", choices=("gpt2-small", "qwen-0.5b", "tiny"),
                       help="instead: every stage on a randomly initialised model of this shape, against the floor "
                            "(writes DIR/speed-SIZE.json and .md)")
    speed.add_argument("--examples", type=int, help="with --size: random training sequences (default 32)")
    speed.add_argument("--rounds", type=int,
                       help="with --size: runs of each compared K = 1 pipeline, median reported (default 3)")
    speed.set_defaults(func=_bench_speed)

    memory = bench.add_parser("memory", help="peak RSS of scoring 1k vs 50k examples (streamed, sharded)",
                              description="Score 1,000 and 50,000 examples of the embedded corpus with a small saved "
                                          "model through run folders (concept_influence and probe_projection), each "
                                          "`score` stage in its own process, and report its peak RSS and time. "
                                          "Writes DIR/memory.json and DIR/memory.md.")
    memory.add_argument("--out", required=True, help="output folder for memory.json and memory.md")
    memory.add_argument("--quick", action="store_true", help="200 vs 1,000 examples (a check that it runs)")
    memory.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    memory.add_argument("--seed", type=int, default=0, help="seed for the corpus and model (default 0)")
    memory.set_defaults(func=_bench_memory)
    _add_gpu_check(bench)
    _add_block_width(bench)
    return bench
