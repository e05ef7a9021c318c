"""Fine-tuning in the planted benchmark: each fine-tune starts again from the pre-trained weights."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from ..data import TokenizedExample
from ..models import ModelAdapter
from .planted_config import PlantedConfig
from .smallmodel import train_model

__all__ = ["Finetuner"]

T = TypeVar("T")


class Finetuner:
    """Fine-tunes copies of the pre-trained model (restoring its weights each time)."""

    def __init__(self, adapter: ModelAdapter, cfg: PlantedConfig, progress: bool):
        self.adapter, self.cfg, self.progress = adapter, cfg, progress
        self.pretrained = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}

    def finetune(self, examples: Sequence[TokenizedExample], seed: int, desc: str = "fine-tune") -> None:
        self.adapter.model.load_state_dict(self.pretrained)
        train_model(self.adapter, examples, self.cfg.finetune_epochs, self.cfg.finetune_lr, self.cfg.batch_size,
                    tokens="response", seed=seed, progress=self.progress, desc=desc)

    def behaviours(self, examples: Sequence[TokenizedExample], measure: Callable[[], T], desc: str) -> list[T]:
        """``measure()`` after fine-tuning on ``examples`` with each of the run's seeds."""
        out = []
        for s in range(self.cfg.n_seeds):
            self.finetune(examples, self.cfg.seed + s, f"{desc} (seed {s})")
            out.append(measure())
        return out
