"""Train a small SAE offline on a model's activations with SAE-Lens.

The activations at one hook are collected once (every real token of the given chats, the forward stopping after
the hook's block) and handed to :func:`probes.sae_training.train_sae_on_activations`, which runs SAE-Lens' own
trainer on them in memory, so any adapter works — TransformerLens or Hugging Face — and nothing is downloaded or
logged to wandb. The result is saved with SAE-Lens' inference format (``cfg.json`` + ``sae_weights.safetensors``)
and read back through :func:`probes.sae.load_sae` (``SAE.load_from_disk``), so what is returned is exactly what
a later session loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from probes.sae import SAEError
from probes.sae_training import SAETrainingResult, check_sae_settings, train_sae_on_activations

from .activations import collect_activations
from .data import TokenizedExample
from .models import ModelAdapter

__all__ = ["train_sae"]


def train_sae(adapter: ModelAdapter, examples: Sequence[TokenizedExample], hook_name: str, d_sae: int,
              out_dir: str | Path | None = None, *, architecture: str = "topk", k: int = 16,
              l1_coefficient: float = 5.0, epochs: float = 10.0, batch_size: int = 256, lr: float = 3e-3,
              held_out: float = 0.1, seed: int = 0, model_name: str | None = None,
              progress: bool = True) -> SAETrainingResult:
    """Train an SAE with ``d_sae`` latents on the activations at ``hook_name`` over every real token of
    ``examples`` and save it with SAE-Lens (``out_dir``; a temporary folder when None).

    ``architecture``: ``"topk"`` (exactly ``k`` latents active per token; SAE-Lens' auxiliary loss revives dead
    latents) or ``"standard"`` (ReLU with an L1 penalty ``l1_coefficient``). Activations are scaled to norm √d_in
    during training (SAE-Lens' ``expected_average_only_in``; the scale is folded into the saved weights, so the SAE
    reads raw activations). The SAE trains and is returned on the model's device.
    ``epochs`` passes over the training tokens, Adam at ``lr``, ``batch_size`` tokens a
    step; a share ``held_out`` of the examples (whole examples, never single tokens) is kept out of training to
    measure the reconstruction. Seeded by ``seed``.

    The SAE's config records ``hook_name``, ``model_name`` (default: the adapter's class) and the model's
    context length, so :func:`~.sae_concepts.check_sae_compatible` can check it against a model later.
    """
    check_sae_settings(d_sae, architecture=architecture, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                       held_out=held_out)
    adapter.check_hook(hook_name)
    if len(examples) < 2 and held_out > 0:
        raise SAEError(f"training an SAE with a held-out share needs at least 2 examples, got {len(examples)}")

    started = time.perf_counter()
    acts = collect_activations(adapter, examples, hook_name, "all_tokens", progress=progress)
    return train_sae_on_activations(
        acts, d_sae, out_dir, architecture=architecture, k=k, l1_coefficient=l1_coefficient, epochs=epochs,
        batch_size=batch_size, lr=lr, held_out=held_out, seed=seed,
        model_name=model_name or type(adapter.model).__name__, context_size=adapter.context_length,
        device=str(adapter.device), extra_metrics={"model_fingerprint": adapter.fingerprint()}, started=started,
        progress=progress)
