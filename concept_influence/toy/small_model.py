"""The small-model kit for the demo, the notebooks, the tests and the benchmarks: a byte-level BPE tokenizer trained
locally, a small TransformerLens model, and a deterministic training loop on chat data."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..data import TokenizedExample, iter_batches
from ..models import HookedTransformerAdapter, ModelAdapter

__all__ = ["train_bpe_tokenizer", "load_tokenizer", "build_small_model", "train_model", "seed_everything"]

SCHEDULES = ("constant", "linear", "cosine")
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's random number generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer (``tokenizers``), save it with ``save_pretrained`` to ``out_dir``
    and reload it with ``AutoTokenizer`` (TransformerLens only accepts a reloaded tokenizer).
    ``<|endoftext|>`` is BOS and EOS, ``<|pad|>`` pads; there is no chat template (the plain one is used)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer folder (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_small_model(
    tokenizer,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 256,
    seed: int = 0,
) -> HookedTransformerAdapter:
    """A randomly initialised ``HookedTransformer`` (LayerNorm, GELU, learned positions) for ``tokenizer``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp or 4 * d_model,
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        default_prepend_bos=False,
        seed=seed,
        device="cpu",
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    return HookedTransformerAdapter(model, tokenizer)


def train_model(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    tokens: str = "response",
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    schedule: str = "constant",
    on_step: Callable[[int, float, torch.optim.Optimizer, bool], None] | None = None,
) -> list[float]:
    """Train with AdamW on the mean per-example loss (``tokens="response"`` or ``"all"``), at a ``constant`` learning
    rate or one decaying ``linear``-ly or along a half ``cosine`` to zero over the run (Hugging Face's and TRL's
    schedules). ``on_step(step, learning_rate, optimizer, epoch_end)`` is called after every optimizer step (``step``
    counts from 1; ``learning_rate`` is the one that step used), e.g. to save checkpoints.

    Deterministic given ``seed`` (shuffling order and dropout-free model). Returns the batch losses.
    """
    if not examples:
        raise ValueError("train_model needs at least one example")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    model = adapter.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_batches = epochs * ((len(examples) + batch_size - 1) // batch_size)
    shape = {"constant": lambda step: 1.0, "linear": lambda step: 1 - step / n_batches,
             "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * step / n_batches))}[schedule]
    decay = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    losses: list[float] = []
    with tqdm(total=n_batches, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            batches = list(iter_batches(examples, batch_size, adapter.pad_token_id, order))
            for i, batch in enumerate(batches):
                loss = adapter.per_example_loss(batch, tokens=tokens).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                used = opt.param_groups[0]["lr"]
                opt.step()
                decay.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses), used, opt, i == len(batches) - 1)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
