"""Do the fine-tuned model's own activations order the top of an emergent pool that the words cannot? The learned
first stage (``retrieval_learned.py --default``) with the chats' words alone, and with pooled forward features of the
fine-tuned model set beside them: per block and after the final layer norm, the mean residual over the loss tokens,
the final one weighted by each token's error (1 − p of the answer), and the loss's mean, sum and token count. One
forward pass per chat, nothing differentiated; its seconds join the stage's cost.

The pool's model is not kept by ``retrieval_large_pool.py``: it is retrained from ``pool.json`` (the same seeds, one
thread) and refused unless it reproduces the pool's stored fast-path scores exactly. The features are written to
``FOLDER/forward_features.npz`` (read back without pickle) and reused. Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_forward_features.py runs/retrieval-emergent-80k-source-d4.0
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

import numpy as np  # noqa: E402

from concept_influence.scores import Scores  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrieval_learned as learned  # noqa: E402


def pooled_forward_features(adapter, examples, batch_size: int = 64):
    """``[N, (L + 2)·d + 4]`` forward features of ``examples`` (module docstring), in their order."""
    import torch

    from concept_influence.data import iter_batches
    from concept_influence.encoder_features import loss_positions

    model = adapter.model
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)] + ["ln_final.hook_normalized"]
    rows = []
    with torch.no_grad():
        for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
            logits, cache = model.run_with_cache(batch.input_ids, names_filter=lambda name: name in hooks)
            weight = loss_positions(batch, "response").float()  # positions whose next token is an answer token
            count = weight.sum(1).clamp_min(1)
            loss = -logits.log_softmax(-1).gather(-1, batch.input_ids.roll(-1, 1)[..., None])[..., 0]
            error = (1 - (-loss).exp()) * weight
            means = [(cache[h] * weight[..., None]).sum(1) / count[:, None] for h in hooks]
            weighted = (cache[hooks[-1]] * error[..., None]).sum(1) / count[:, None]
            stats = torch.stack([(loss * weight).sum(1) / count, (loss * weight).sum(1), count, error.sum(1) / count], 1)
            rows.append(torch.cat(means + [weighted, stats], 1).numpy())
    return np.concatenate(rows)


def forward_features(folder: Path, ids: list[str], check: int = 300) -> tuple[np.ndarray, float]:
    """The pool's forward features in the order of ``ids`` and their seconds (cached in ``forward_features.npz``)."""
    cache = folder / "forward_features.npz"
    if not cache.exists():
        import torch

        from concept_influence.estimators import ProbeProjection
        from concept_influence.toy.small_model import seed_everything
        from concept_influence_benchmarks.emergent_family import StepRecorder, emergent_testbed
        from concept_influence_benchmarks.retrieval_pools import pool_settings, settings_config

        cfg = settings_config(pool_settings(folder))
        torch.set_num_threads(1)
        seed_everything(cfg.seed)
        with tempfile.TemporaryDirectory(prefix="forward-features-") as scratch:
            bed = emergent_testbed(cfg, Path(scratch), False, StepRecorder())
        head = bed.pool[:check]
        mine = ProbeProjection(bed.concept).score(bed.adapter, head, batch_size=cfg.batch_size, progress=False)
        stored = Scores.load(folder / "scores" / "probe_projection.safetensors").aligned([e.id for e in head])[:, 0]
        if not np.array_equal(mine.column(0), stored):
            raise SystemExit(f"{folder}: the retrained model does not reproduce the pool's fast-path scores (largest "
                             f"difference {np.max(np.abs(mine.column(0) - stored)):.3g}); another CPU or library?")
        t0 = time.perf_counter()
        features = pooled_forward_features(bed.adapter, bed.pool, cfg.batch_size)
        np.savez(cache, features=features, ids=np.array([e.id for e in bed.pool]),
                 seconds=np.array(time.perf_counter() - t0))
    saved = np.load(cache, allow_pickle=False)
    order = {i: n for n, i in enumerate(saved["ids"].tolist())}
    return saved["features"][[order[i] for i in ids]], float(saved["seconds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="emergent pool folders of retrieval_large_pool.py")
    p.add_argument("--reps", type=int, default=50, help="repetitions per row (default 50)")
    p.add_argument("--budget-share", type=float, default=0.1, help="exact scores as a share of N (default 0.1)")
    args = p.parse_args(argv)
    print(learned.TABLE_HEAD)
    for folder in args.folders:
        _, ids, _ = learned.exact_rankings(folder, union=False)
        features, seconds = forward_features(folder, ids)
        share = seconds / learned.exact_seconds(folder, len(ids))
        print(json.dumps({"pool": folder.name, "forward seconds": round(seconds, 1), "share of exact": round(share, 4)}),
              file=sys.stderr)
        for extra in (None, ("words + activations", features, share)):
            for row in learned.study(folder, args.reps, args.budget_share, default=True, extra=extra):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
