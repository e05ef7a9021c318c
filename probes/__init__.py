"""Where a concept lives in a model: activations, probes and concept directions."""

from .activations import REDUCTIONS, Activations, collect_activations, reduce_tokens, token_mask
from .directions import DIRECTION_KINDS, ConceptDirection, DirectionError, load_persona_vector
from .linear import PROBE_KINDS, ProbeResult, train_diff_means_probe, train_logistic_probe, train_probe
from .sae import SAEError, check_sae_compatible, load_pretrained_sae, load_sae, sae_direction
from .sae_latents import (LatentActivations, LatentRanking, latent_activations, latent_concept, rank_latents,
                          top_activating_examples)
from .sae_training import SAETrainingResult, train_sae
