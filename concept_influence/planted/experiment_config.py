"""The planted benchmark's settings (:class:`PlantedConfig`) and the error a setting that cannot work raises."""

from __future__ import annotations

from dataclasses import dataclass

from probes import PROBE_KINDS, REDUCTIONS

from ..concepts import DEFAULT_QUERY
from ..errors import ConceptInfluenceError
from ..models import MODEL_DTYPES
from ..toy.small_model import SCHEDULES

__all__ = ["BenchmarkError", "PlantedConfig", "check_planting"]


class BenchmarkError(ConceptInfluenceError, ValueError):
    """A benchmark setting that cannot work (rate, sizes, seeds, layer); the message names the setting."""


def check_planting(cfg) -> None:
    """The settings every planting benchmark shares: the rate, the fine-tuning seeds, the removed fractions and the
    learning-rate schedule (:class:`BenchmarkError` naming the option)."""
    if not 0 < cfg.rate <= 0.5:
        raise BenchmarkError(f"--rate must be in (0, 0.5], got {cfg.rate}")
    if cfg.n_seeds < 1:
        raise BenchmarkError(f"--n-seeds must be at least 1, got {cfg.n_seeds}")
    if any(not 0 < f < 1 for f in cfg.remove_fractions):
        raise BenchmarkError(f"--remove-fractions must be in (0, 1), got {list(cfg.remove_fractions)}")
    if cfg.lr_schedule not in SCHEDULES:
        raise BenchmarkError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")


@dataclass
class PlantedConfig:
    """Sizes, model and training settings of a planted benchmark run (all counts are prompts)."""

    rate: float = 0.1
    paired: bool = False
    n_probe: int = 400
    n_pretrain: int = 2500
    n_pool: int = 1200
    n_eval: int = 200
    n_test: int = 64
    vocab_size: int = 2048
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    max_length: int = 256
    layer: int | None = None
    pretrain_epochs: int = 2
    finetune_epochs: int = 2
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    lr_schedule: str = "constant"  # the fine-tunes' learning rate: constant, or linear decay to zero
    batch_size: int = 16
    max_new_tokens: int = 64
    n_seeds: int = 3
    remove_fractions: tuple[float, ...] = (0.1,)
    lds: int = 0
    seed: int = 0
    sae_latents: int = 0  # > 0: the SAE stage (sae_stage.py) with an SAE of this many latents
    sae_k: int = 16
    sae_epochs: float = 10.0
    retrain: bool = True  # False: skip the behaviour measurement and filter-and-retrain
    probe_kind: str = "diff_means"  # the concept's probe: diff_means (difference of means, a persona vector) or logistic
    query: str = DEFAULT_QUERY  # where Concept Influence reads the concept on the evaluation prompts
    compare_query: str | None = "response_mean"  # a second concept_influence with this query, for comparison
    query_study: bool = False  # also score every query variant (query_study.py) on the trained model
    curvature_study: bool = False  # also score every preconditioning variant (curvature_study.py)
    concept_check: bool = True  # steer along the probe direction: is the concept causal for the behaviour?
    over_checkpoints: bool = True  # also concept_influence/concept_grad_dot summed over pre-trained and fine-tuned model
    estimators: tuple[str, ...] = ()  # score only these estimators (by name, checked once built); empty: every one
    lds_seeds: int = 2  # fine-tuning seeds per concept-LDS subset (two give the ceiling: seed vs seed)
    lds_fraction: float = 0.5  # share of the pool in each concept-LDS subset
    model: str | None = None  # a Hugging Face causal LM folder: every fine-tune is a LoRA fine-tune of it (no small model)
    lora_rank: int = 8  # with model: the rank of the LoRA adapters (alpha = 2 x rank, no dropout)
    lora_targets: tuple[str, ...] = ()  # with model: the module names adapted; empty: every linear map in the blocks
    dtype: str = "auto"  # with model: what it computes in (auto: as saved; the LoRA weights stay float32)
    device: str = "cpu"  # with model: cpu or cuda

    def __post_init__(self):
        check_planting(self)
        if self.lds == 1 or self.lds < 0:
            raise BenchmarkError(f"--lds needs at least 2 subsets (or 0 for none), got {self.lds}")
        if self.sae_latents < 0 or (self.sae_latents and not 1 <= self.sae_k <= self.sae_latents):
            raise BenchmarkError(f"--sae-latents must be >= 0 and --sae-k in 1..sae-latents, got {self.sae_latents} "
                                 f"and {self.sae_k}")
        for option, value in (("--query", self.query), ("--compare-query", self.compare_query)):
            if value is not None and value not in REDUCTIONS:
                raise BenchmarkError(f"{option} must be one of {', '.join(REDUCTIONS)}, got {value!r}")
        if self.probe_kind not in PROBE_KINDS:
            raise BenchmarkError(f"--probe-kind must be one of {', '.join(PROBE_KINDS)}, got {self.probe_kind!r}")
        if not 0 < self.lds_fraction < 1:
            raise BenchmarkError(f"--lds-fraction must be in (0, 1), got {self.lds_fraction}")
        if self.lds_seeds < 1:
            raise BenchmarkError(f"--lds-seeds must be at least 1, got {self.lds_seeds}")
        if self.lora_rank < 1:
            raise BenchmarkError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.dtype not in ("auto", *MODEL_DTYPES):
            raise BenchmarkError(f"--dtype must be one of auto, {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise BenchmarkError(f"--device must be cpu or cuda, got {self.device!r}")
        self.remove_fractions, self.lora_targets = tuple(self.remove_fractions), tuple(self.lora_targets)
        self.estimators = tuple(self.estimators)

    @property
    def n_planted(self) -> int:
        return round(self.rate * self.n_pool)

    @property
    def probe_layer(self) -> int:
        """The probe's block: ``layer`` or the last block (where the last-prompt query worked best in the query
        study on these small models)."""
        layer = self.n_layers - 1 if self.layer is None else self.layer
        if not 0 <= layer < self.n_layers:
            raise BenchmarkError(f"--layer {layer} is outside the model's blocks 0..{self.n_layers - 1}")
        return layer

    @classmethod
    def quick(cls, **overrides) -> "PlantedConfig":
        """A reduced size for tests (well under a minute on 2 cores)."""
        small = dict(n_probe=40, n_pretrain=120, n_pool=120, n_eval=16, n_test=16, vocab_size=400, n_layers=2,
                     d_model=32, n_heads=2, max_length=128, pretrain_epochs=2, finetune_epochs=2, pretrain_lr=3e-3,
                     finetune_lr=3e-3, max_new_tokens=24, n_seeds=3)
        return cls(**{**small, **overrides})
