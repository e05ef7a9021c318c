"""``concept-influence sae train|latents|explain``: SAE concepts from the command line.

Kept apart from :mod:`concept_influence.cli`, which calls :func:`add_sae_commands` from ``build_parser``; its
``main`` prints the SAE errors (``SAEError`` is a ``DirectionError``) as one line. Models are folders written by
:func:`concept_influence.models.save_model` (or Hugging Face ``save_pretrained``); SAEs are SAE-Lens folders
(``cfg.json`` + ``sae_weights.safetensors``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from probes.sae_latents import SORT_KEYS
from probes.sae_training import SAE_ARCHITECTURES

from .cli_common import add_dtype_option, read_examples, read_scores

__all__ = ["add_sae_commands", "add_sae_benchmark_options", "sae_benchmark_overrides"]


def _sae_train(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sae_training import train_sae

    adapter = load_model(args.model, dtype=args.dtype)
    examples = read_examples(args.data, adapter, args.max_length)
    result = train_sae(adapter, examples, args.hook, args.d_sae, args.out, architecture=args.architecture, k=args.k,
                       l1_coefficient=args.l1, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       held_out=args.held_out, seed=args.seed, model_name=str(args.model),
                       progress=not args.no_progress)
    m = result.metrics
    print(f"SAE {m['architecture']} d_sae {m['d_sae']} at {m['hook_name']} on {m['train_tokens']} tokens of "
          f"{m['examples']} examples ({m['seconds']:.0f} s): held-out explained variance {m['explained_variance']:.3f}, "
          f"L0 {m['l0']:.1f}, {m['dead_latents']} dead latents\nsaved to {result.path} (SAE.load_from_disk reads it)")
    return 0


def _load(args: argparse.Namespace):
    from probes.sae import load_sae

    from .models import load_model
    from .sae_concepts import check_sae_compatible

    adapter = load_model(args.model, dtype=args.dtype)
    sae = load_sae(args.sae)
    check_sae_compatible(sae, adapter)
    return adapter, sae


def _sae_latents(args: argparse.Namespace) -> int:
    from probes.directions import ConceptDirection
    from probes.sae import sae_hooks

    from .fileio import atomic_write_text
    from .sae_concepts import behaviour_latents, format_top_examples

    adapter, sae = _load(args)
    probe = ConceptDirection.load(args.probe) if args.probe else None
    pos, neg = (read_examples([p], adapter, args.max_length) for p in (args.positive, args.negative))
    ranking, examples = behaviour_latents(sae, adapter, pos, neg, probe=probe, sort_by=args.sort_by, top=args.top,
                                          show=args.latents, n_examples=args.examples, progress=not args.no_progress)
    text = (f"# SAE latents of the behaviour\n\nSAE `{args.sae}` at `{sae_hooks(sae)[0]}` on model `{args.model}`; "
            f"{len(pos)} positive ({args.positive}) and {len(neg)} negative ({args.negative}) examples; ranked by "
            f"{args.sort_by}.\n\n{ranking.to_markdown(args.top)}\n\n## Top activating examples\n\n"
            f"{format_top_examples(examples, ranking.labels)}")
    print(text)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "latents.md", text)
        atomic_write_text(out / "latents.json", json.dumps(
            {"sae": str(args.sae), "model": str(args.model), "sort_by": args.sort_by, "ranking": ranking.rows(),
             "top_examples": {str(k): v for k, v in examples.items()}}, indent=1))
        print(f"written: {out / 'latents.md'}, {out / 'latents.json'}")
    return 0


def _sae_explain(args: argparse.Namespace) -> int:
    from .data import DataError
    from .explain import explain_to_folder

    adapter, sae = _load(args)
    scores = read_scores(args.scores)
    examples = read_examples(args.data, adapter, args.max_length)
    known = set(scores.ids)
    missing = [e.id for e in examples if e.id not in known]
    if missing:
        raise DataError(f"{len(missing)} examples of {', '.join(args.data)} have no score in {args.scores} "
                        f"(first: {missing[0]}); pass the training data the scores were computed on")
    column = args.column if args.column is None or not args.column.isdigit() else int(args.column)
    if isinstance(column, str) and column not in scores.columns:
        raise DataError(f"--column {column!r} is not in {args.scores} (columns: {', '.join(scores.columns)})")
    out = Path(args.out)
    print(explain_to_folder(scores, sae, adapter, examples, out, args.top_k, n_latents=args.n_latents,
                            progress=not args.no_progress, column=column or 0,
                            latents_per_example=args.latents_per_example, n_clusters=args.clusters, center=args.center))
    print(f"written: {out / 'explain.md'}, {out / 'explain.json'}, {out / 'latent_influence.png'}")
    return 0


def _common(p: argparse.ArgumentParser, sae: bool = True) -> None:
    p.add_argument("--model", required=True, help="model folder (concept_influence.models.save_model or Hugging Face "
                                                  "save_pretrained, with its tokenizer)")
    add_dtype_option(p)
    if sae:
        p.add_argument("--sae", required=True, help="SAE-Lens folder with cfg.json and sae_weights.safetensors")
    p.add_argument("--max-length", type=int, help="tokens per example; examples whose response is cut away are "
                                                   "skipped (default: the model's context length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_sae_commands(sub) -> None:
    """Add ``sae train``, ``sae latents`` and ``sae explain`` to the top-level subparsers ``sub``."""
    sae = sub.add_parser("sae", help="SAE concepts: train an SAE, find a behaviour's latents, explain a ranking")
    cmds = sae.add_subparsers(dest="sae_command", required=True)

    train = cmds.add_parser(
        "train", help="train a small SAE on a model's activations (SAE-Lens, offline)",
        description="Collect the activations at HOOK over every token of the chat JSONL files, train an SAE with "
                    "SAE-Lens' trainer (no wandb, nothing downloaded), and save it in SAE-Lens' format to OUT "
                    "(SAE.load_from_disk reads it) with OUT/training.json (settings, held-out explained variance, "
                    "L0, dead latents).")
    _common(train, sae=False)
    train.add_argument("--data", required=True, nargs="+", help="chat data (.jsonl, .jsonl.gz, .parquet, .arrow or a "
                                                                 "saved dataset folder) to read "
                                                                 "activations on")
    train.add_argument("--hook", required=True, help="hook name, e.g. blocks.0.hook_resid_post")
    train.add_argument("--d-sae", type=int, required=True, help="number of latents")
    train.add_argument("--architecture", choices=SAE_ARCHITECTURES, default="topk",
                       help="topk: K latents active per token; standard: ReLU with an L1 penalty (default topk)")
    train.add_argument("--k", type=int, default=16, help="active latents per token for topk (default 16)")
    train.add_argument("--l1", type=float, default=5.0, help="L1 coefficient for standard (default 5.0)")
    train.add_argument("--epochs", type=float, default=10.0, help="passes over the training tokens (default 10)")
    train.add_argument("--batch-size", type=int, default=256, help="tokens per training step (default 256)")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-decayed (default 3e-3)")
    train.add_argument("--held-out", type=float, default=0.1,
                       help="share of the examples kept out of training to measure the reconstruction (default 0.1)")
    train.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and order (default 0)")
    train.add_argument("--out", required=True, help="output folder for the SAE")
    train.set_defaults(func=_sae_train)

    latents = cmds.add_parser(
        "latents", help="rank SAE latents by how well they separate concept-positive from negative texts",
        description="Per latent: mean activation over the response tokens of positive and negative examples, "
                    "difference, AUROC, firing frequency and, with --probe, the cosine of its decoder row and encoder "
                    "column with the probe; then the top activating examples of the best latents.")
    _common(latents)
    latents.add_argument("--positive", required=True, help="chat JSONL with concept-positive examples")
    latents.add_argument("--negative", required=True, help="chat JSONL with concept-negative examples")
    latents.add_argument("--probe", help="a saved ConceptDirection (.safetensors) at the SAE's hook, for cosines")
    latents.add_argument("--sort-by", choices=SORT_KEYS, default="auroc",
                         help="ranking key (cos_* need --probe; default auroc)")
    latents.add_argument("--top", type=int, default=15, help="latents in the table (default 15)")
    latents.add_argument("--examples", type=int, default=5, help="top activating examples per latent (default 5)")
    latents.add_argument("--latents", metavar="L", nargs="+", type=int,
                         help="show the top activating examples of these latents (default: the top of the ranking)")
    latents.add_argument("--out", help="folder for latents.md and latents.json (default: print only)")
    latents.set_defaults(func=_sae_latents)

    explain = cmds.add_parser(
        "explain", help="explain the top of a ranking with SAE latents",
        description="For the TOP_K highest-scored training examples: the latents they share, the latents "
                    "over-represented among them, clusters of them by latents, and influence aggregated per latent. "
                    "Writes OUT/explain.md, OUT/explain.json and OUT/latent_influence.png.")
    _common(explain)
    explain.add_argument("--data", required=True, nargs="+", help="the chat JSONL file(s) the scores are for")
    explain.add_argument("--scores", required=True, help="scores saved with Scores.save (.safetensors + .json)")
    explain.add_argument("--column", help="score column (name or index; default the first)")
    explain.add_argument("--top-k", type=int, default=50, help="top-ranked examples to explain (default 50)")
    explain.add_argument("--latents-per-example", type=int, default=8,
                         help="an example's characteristic latents: its M most active (default 8)")
    explain.add_argument("--clusters", type=int, help="number of clusters (default about sqrt(TOP_K / 2))")
    explain.add_argument("--n-latents", type=int, default=10, help="latents per table (default 10)")
    explain.add_argument("--center", action="store_true",
                         help="split each score minus the mean score (for scores with an offset, e.g. projections)")
    explain.add_argument("--out", required=True, help="output folder")
    explain.set_defaults(func=_sae_explain)


def add_sae_benchmark_options(p: argparse.ArgumentParser) -> None:
    """The planted benchmark's SAE options (``--sae-latents`` and friends, ``--no-retrain``)."""
    p.add_argument("--sae-latents", type=int, default=0, metavar="D_SAE",
                   help="also train an SAE with D_SAE latents at the probe's hook on the pool, rank its latents, and "
                        "score with the best latent as the concept (default 0: no SAE)")
    p.add_argument("--sae-k", type=int, help="active latents per token of that SAE (topk; default 16)")
    p.add_argument("--sae-epochs", type=float, help="SAE training epochs over the pool's tokens (default 10)")
    p.add_argument("--no-retrain", action="store_true",
                   help="skip the behaviour measurement and filter-and-retrain (retrieval only; much faster)")


def sae_benchmark_overrides(args: argparse.Namespace) -> dict:
    """PlantedConfig fields from :func:`add_sae_benchmark_options`."""
    out = {"sae_latents": args.sae_latents, "retrain": not args.no_retrain}
    if args.sae_k is not None:
        out["sae_k"] = args.sae_k
    if args.sae_epochs is not None:
        out["sae_epochs"] = args.sae_epochs
    return out
