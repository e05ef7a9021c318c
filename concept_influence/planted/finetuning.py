"""Fine-tuning in the planted benchmark: each fine-tune starts again from the pre-trained weights (of the small model,
or of the LoRA adapters of the user's model: :func:`lora_model`)."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from ..data import TokenizedExample
from ..models import HFCausalLMAdapter, ModelAdapter, as_adapter, checkpointed_weights, load_model
from ..toy.small_model import train_model
from .experiment_config import BenchmarkError, PlantedConfig

__all__ = ["Finetuner", "lora_model"]

T = TypeVar("T")


class Finetuner:
    """Fine-tunes copies of the pre-trained model (restoring its weights each time)."""

    def __init__(self, adapter: ModelAdapter, cfg: PlantedConfig, progress: bool):
        self.adapter, self.cfg, self.progress = adapter, cfg, progress
        self.pretrained = checkpointed_weights(adapter)  # a PEFT model's adapter weights only: the rest stays frozen

    def finetune(self, examples: Sequence[TokenizedExample], seed: int, desc: str = "fine-tune") -> None:
        self.adapter.model.load_state_dict(self.pretrained, strict=False)
        train_model(self.adapter, examples, self.cfg.finetune_epochs, self.cfg.finetune_lr, self.cfg.batch_size,
                    tokens="response", seed=seed, progress=self.progress, desc=desc, schedule=self.cfg.lr_schedule)

    def behaviours(self, examples: Sequence[TokenizedExample], measure: Callable[[], T], desc: str) -> list[T]:
        """``measure()`` after fine-tuning on ``examples`` with each of the run's seeds."""
        out = []
        for s in range(self.cfg.n_seeds):
            self.finetune(examples, self.cfg.seed + s, f"{desc} (seed {s})")
            out.append(measure())
        return out


def lora_model(cfg: PlantedConfig) -> ModelAdapter:
    """The Hugging Face causal LM of ``cfg.model`` (in ``cfg.dtype`` on ``cfg.device``) with fresh LoRA adapters of
    rank ``cfg.lora_rank`` (alpha twice the rank, no dropout, ``lora_B`` zero as PEFT initialises it) on
    ``cfg.lora_targets`` (default: every linear map of the blocks); the fine-tunes train the adapters only."""
    from peft import LoraConfig, get_peft_model

    adapter = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if not isinstance(adapter, HFCausalLMAdapter) or adapter.track == "lora":
        raise BenchmarkError(f"--model {cfg.model}: expected a Hugging Face causal LM folder without adapters (the "
                             "benchmark fine-tunes its own LoRA adapters on it)")
    if adapter.context_length is not None and cfg.max_length > adapter.context_length:
        raise BenchmarkError(f"--max-length {cfg.max_length} exceeds the model's context length {adapter.context_length}")
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets) or "all-linear")
    try:
        model = get_peft_model(adapter.model, lora)
    except ValueError as e:
        raise BenchmarkError(f"--lora-targets {' '.join(cfg.lora_targets)}: {str(e).splitlines()[0]}") from None
    return as_adapter(model, adapter.tokenizer)
