"""Train a small SAE offline with SAE-Lens on activations already collected.

Per-token activations at one hook (an :class:`~probes.activations.Activations` with reduction ``all_tokens``)
are fed to SAE-Lens' own trainer (``sae_lens.SAETrainer``, the loop behind ``LanguageModelSAETrainingRunner``) as
an in-memory data provider, so they can come from any model and nothing is downloaded or logged to wandb. The
result is saved with SAE-Lens' inference format (``cfg.json`` + ``sae_weights.safetensors``) and read back
through :func:`probes.sae.load_sae` (``SAE.load_from_disk``), so what is returned is exactly what a later session
loads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .activations import Activations
from .fileio import atomic_write_text
from .sae import SAEError, load_sae

__all__ = ["SAE_ARCHITECTURES", "SAETrainingResult", "check_sae_settings", "train_sae_on_activations",
           "sae_reconstruction_metrics"]

SAE_ARCHITECTURES = ("topk", "standard")
TRAINING_FILE = "training.json"  # our settings and metrics, beside SAE-Lens' cfg.json (which ignores it)


@dataclass
class SAETrainingResult:
    """A trained SAE (the inference SAE read back from disk), the folder it was saved in (None when no
    ``out_dir`` was given) and ``metrics``: token counts, seconds, and on the held-out tokens the explained variance
    of the reconstruction, the mean number of active latents (L0) and the latents never active on any token."""

    sae: Any
    path: Path | None
    metrics: dict = field(default_factory=dict)


@torch.no_grad()
def sae_reconstruction_metrics(sae, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """Explained variance of ``sae``'s reconstruction of ``acts`` ``[n, d_in]`` (1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²),
    mean L0 (active latents per row) and how often each latent fires (``active_share`` ``[d_sae]``)."""
    err = total = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    mean = acts.double().mean(0)
    device = sae.W_enc.device
    for i in range(0, len(acts), batch_size):
        x = acts[i: i + batch_size].float().to(device)
        z = sae.encode(x)
        err += float((sae.decode(z).double() - x.double()).square().sum())
        total += float((x.double() - mean.to(device)).square().sum())
        active = z > 0
        l0 += float(active.sum())
        fired += active.sum(0).double().cpu()
    n = max(len(acts), 1)
    return {"explained_variance": 1 - err / total if total > 0 else float("nan"), "l0": l0 / n,
            "active_share": (fired / n).numpy()}


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of rows, epoch after epoch, forever (SAE-Lens' DataProvider protocol)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for i in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[order[i: i + batch_size]]


@contextlib.contextmanager
def _quiet_sae_lens(progress: bool):
    """SAE-Lens' trainer always draws tqdm bars; without ``progress`` give its modules a disabled tqdm."""
    if progress:
        yield
        return
    import importlib

    from tqdm.auto import tqdm

    patched = []
    for name in ("sae_lens.training.sae_trainer", "sae_lens.training.activation_scaler"):
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original


def check_sae_settings(d_sae: int, *, architecture: str = "topk", k: int = 16, epochs: float = 10.0,
                       batch_size: int = 256, lr: float = 3e-3, held_out: float = 0.1) -> None:
    """Raise :class:`SAEError` for training settings :func:`train_sae_on_activations` cannot use."""
    if architecture not in SAE_ARCHITECTURES:
        raise SAEError(f"architecture must be one of {SAE_ARCHITECTURES}, got {architecture!r}")
    if d_sae < 1:
        raise SAEError(f"d_sae must be at least 1, got {d_sae}")
    if architecture == "topk" and not 1 <= k <= d_sae:
        raise SAEError(f"k (active latents per token) must be in 1..d_sae={d_sae}, got {k}")
    if not 0 <= held_out < 1:
        raise SAEError(f"held_out must be in [0, 1), got {held_out}")
    if epochs <= 0 or batch_size < 1 or lr <= 0:
        raise SAEError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")


def train_sae_on_activations(acts: Activations, d_sae: int, out_dir: str | Path | None = None, *,
                             architecture: str = "topk", k: int = 16, l1_coefficient: float = 5.0,
                             epochs: float = 10.0, batch_size: int = 256, lr: float = 3e-3, held_out: float = 0.1,
                             seed: int = 0, model_name: str | None = None, context_size: int | None = None,
                             device: str = "cpu", extra_metrics: Mapping[str, Any] | None = None,
                             started: float | None = None, progress: bool = True) -> SAETrainingResult:
    """Train an SAE with ``d_sae`` latents on the per-token activations ``acts`` (reduction ``all_tokens``: rows
    are tokens, ``example_index`` their example) at ``acts.hook_name`` and save it with SAE-Lens (``out_dir``; a
    temporary folder when None).

    ``architecture``: ``"topk"`` (exactly ``k`` latents active per token; SAE-Lens' auxiliary loss revives dead
    latents) or ``"standard"`` (ReLU with an L1 penalty ``l1_coefficient``). Activations are scaled to norm √d_in
    during training (SAE-Lens' ``expected_average_only_in``; the scale is folded into the saved weights, so the SAE
    reads raw activations). The SAE trains and is returned on ``device``. ``epochs`` passes over the training
    tokens, Adam at ``lr``, ``batch_size`` tokens a step; a share ``held_out`` of the examples (whole examples,
    never single tokens) is kept out of training to measure the reconstruction. Seeded by ``seed``.

    The SAE's config records the hook, ``model_name`` and ``context_size``. ``metrics`` (also written to
    ``training.json`` beside the SAE) end with ``extra_metrics``; ``seconds`` counts from ``started``
    (a ``time.perf_counter()`` value, e.g. from before the activations were collected; default: this call).
    """
    from sae_lens import (
        LoggingConfig,
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig

    check_sae_settings(d_sae, architecture=architecture, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                       held_out=held_out)
    if acts.example_index is None:
        raise SAEError(f"an SAE trains on per-token activations (reduction 'all_tokens'), got {acts.reduction!r}")
    hook_name, n_examples = acts.hook_name, len(acts.ids)
    if n_examples < 2 and held_out > 0:
        raise SAEError(f"training an SAE with a held-out share needs at least 2 examples, got {n_examples}")

    started = time.perf_counter() if started is None else started
    rng = np.random.default_rng(seed)
    n_held = int(round(held_out * n_examples)) if held_out else 0
    held = torch.from_numpy(np.isin(acts.example_index.numpy(), rng.permutation(n_examples)[:n_held]))
    train_acts, test_acts = acts.values[~held].contiguous(), acts.values[held].contiguous()
    if len(train_acts) < batch_size:
        raise SAEError(f"{len(train_acts)} training tokens at {hook_name} are fewer than one batch of {batch_size}; "
                       "pass more examples or a smaller batch_size")

    d_in = acts.values.shape[1]
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations="expected_average_only_in")
    if architecture == "topk":
        cfg, cls = TopKTrainingSAEConfig(k=k, **common), TopKTrainingSAE
    else:
        cfg, cls = StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common), StandardTrainingSAE
    cfg.metadata.hook_name = hook_name
    cfg.metadata.model_name = model_name
    cfg.metadata.context_size = context_size
    cfg.metadata.prepend_bos = False
    torch.manual_seed(seed)
    training_sae = cls(cfg)
    total = int(epochs * len(train_acts))
    steps = max(total // batch_size, 1)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=batch_size, lr=lr, lr_end=lr / 10,
        lr_scheduler_name="cosineannealing", lr_decay_steps=steps, lr_warm_up_steps=min(100, steps // 10),
        dead_feature_window=max(steps // 10, 1), feature_sampling_window=max(steps // 5, 1),
        n_batches_for_norm_estimate=min(100, max(len(train_acts) // batch_size, 1)),
        logger=LoggingConfig(log_to_wandb=False), device=str(device))
    with _quiet_sae_lens(progress):
        trained = SAETrainer(trainer_cfg, training_sae, _batches(train_acts, batch_size, seed)).fit()
    seconds = time.perf_counter() - started

    with contextlib.ExitStack() as stack:
        folder = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        trained.save_inference_model(folder)
        sae = load_sae(folder, device=str(device))
        if out_dir is None:
            sae.cfg.metadata.loaded_from = None
    on_test = sae_reconstruction_metrics(sae, test_acts if len(test_acts) else train_acts)
    on_all = sae_reconstruction_metrics(sae, acts.values)
    metrics = {
        "hook_name": hook_name, "architecture": architecture, "d_in": d_in, "d_sae": d_sae,
        "k": k if architecture == "topk" else None, "l1_coefficient": l1_coefficient if architecture == "standard" else None,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "examples": n_examples,
        "train_tokens": len(train_acts), "held_out_tokens": len(test_acts), "steps": steps,
        "explained_variance": on_test["explained_variance"], "l0": on_test["l0"],
        "dead_latents": int((on_all["active_share"] == 0).sum()), "seconds": seconds, **(extra_metrics or {}),
    }
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / TRAINING_FILE, json.dumps(metrics, indent=1))
    return SAETrainingResult(sae, Path(out_dir) if out_dir is not None else None, metrics)
