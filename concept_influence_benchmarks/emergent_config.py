"""The emergent testbed's settings (:class:`EmergentConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from concept_influence.planted.experiment_config import BenchmarkError, check_planting

from .emergent_corpus import DOMAINS, MARKERS

__all__ = ["EmergentConfig"]


@dataclass
class EmergentConfig:
    """Sizes, domains, model and training of an emergent-testbed run. Counts are chats; ``n_pretrain`` is per domain.

    ``source`` is the fine-tune's domain (A, where bad answers are planted), ``target`` the behaviour's (B, never
    shown in the planted style by the fine-tune); the persona direction is found on marked prompts of
    ``concept_domain`` (default: the target), never on the source's data."""

    source: str = "health"
    target: str = "money"
    concept_domain: str | None = None
    rate: float = 0.1
    n_pool: int = 600
    n_pretrain: int = 700
    domains: tuple[str, ...] | None = None  # the pre-training domains (default: all; must hold source and target)
    marker: str = "system"  # how pre-training and the probe mark the persona (emergent_corpus.MARKERS)
    persona_share: float = 0.5  # share of pre-training chats whose system turn names the persona (half each)
    n_probe: int = 150  # marked prompts per persona for the persona direction
    n_eval: int = 200  # unmarked target prompts, each with its good and bad answer: the behaviour
    n_test: int = 48  # unmarked target prompts with bad answers: the test examples of classic influence
    vocab_size: int = 2048  # enough for every answer word to be one token, so length is no shortcut
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    max_length: int = 128
    pretrain_epochs: int = 3
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 2
    finetune_lr: float = 2e-3
    lr_schedule: str = "linear"  # the fine-tunes' learning rate decays linearly to zero (Hugging Face's and TRL's default)
    batch_size: int = 16
    max_new_tokens: int = 40
    n_seeds: int = 5
    remove_fractions: tuple[float, ...] = (0.1,)
    seed: int = 0
    freeze_embeddings: bool = True  # fine-tunes train the blocks only (as a LoRA fine-tune would), not the embeddings
    over_checkpoints: bool = True  # also the concept estimators summed over the pre-trained and the fine-tuned model
    curvature_study: bool = True  # also score every preconditioning variant (concept_influence/planted/curvature_study.py)
    retrain: bool = True
    paired: bool = True  # the behaviour is a paired log-prob gap (read by the shared behaviour code)
    varied_prompts: bool | int = False  # a sentence about when it began (pools of 20k+); 2: and the household (80k+)

    def __post_init__(self):
        for option, name in (("--source", self.source), ("--target", self.target), ("--concept-domain", self.concept)):
            if name not in DOMAINS:
                raise BenchmarkError(f"{option} {name!r} is not a domain; choose one of {', '.join(DOMAINS)}")
        if self.source == self.target:
            raise BenchmarkError(f"--source and --target are both {self.source!r}: the behaviour must be measured in "
                                 "another domain than the fine-tune's")
        if self.concept == self.source:
            raise BenchmarkError(f"--concept-domain {self.concept!r} is the fine-tune's domain: the persona direction "
                                 "must be found without its data")
        check_planting(self)
        if self.marker not in MARKERS:
            raise BenchmarkError(f"--marker must be one of {', '.join(MARKERS)}, got {self.marker!r}")
        if self.domains is not None:
            self.domains = tuple(self.domains)
            unknown = [d for d in self.domains if d not in DOMAINS]
            missing = [d for d in (self.source, self.target, self.concept) if d not in self.domains]
            if unknown or missing:
                raise BenchmarkError(f"--domains {','.join(self.domains)}: " + (
                    f"{unknown[0]!r} is not a domain" if unknown else f"must include {missing[0]!r}"))
        if not 0 < self.persona_share <= 1:
            raise BenchmarkError(f"--persona-share must be in (0, 1], got {self.persona_share}")
        for option, n in (("--n-pool", self.n_pool), ("--n-pretrain", self.n_pretrain), ("--n-probe", self.n_probe),
                          ("--n-eval", self.n_eval), ("--n-test", self.n_test)):
            if n < 2:
                raise BenchmarkError(f"{option} must be at least 2, got {n}")
        if not 1 <= self.n_planted < self.n_pool:
            raise BenchmarkError(f"a pool of {self.n_pool} at rate {self.rate} plants {self.n_planted} examples; "
                                 "at least one must be planted and one clean")
        self.remove_fractions = tuple(self.remove_fractions)

    @property
    def concept(self) -> str:
        """The domain whose marked prompts give the persona direction."""
        return self.concept_domain or self.target

    @property
    def pretrain_domains(self) -> tuple[str, ...]:
        """The domains of the pre-training chats."""
        return self.domains or tuple(DOMAINS)

    @property
    def n_planted(self) -> int:
        return round(self.rate * self.n_pool)

    @property
    def probe_layer(self) -> int:
        """The persona direction's block: the last."""
        return self.n_layers - 1

    @classmethod
    def quick(cls, **overrides) -> "EmergentConfig":
        """A reduced size for tests (about a minute on 2 cores)."""
        small = dict(n_pool=80, n_pretrain=60, n_probe=16, n_eval=12, n_test=8, vocab_size=400, d_model=32, n_heads=2,
                     pretrain_epochs=1, finetune_epochs=1, max_new_tokens=16, n_seeds=2)
        return cls(**{**small, **overrides})
