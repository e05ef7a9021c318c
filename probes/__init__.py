"""Where a concept lives in activations: token reductions, probes, concept directions and SAE latents.

The lower layer of the toolkit: everything here works on activation tensors and SAEs (arrays in, fitted objects
out) and never runs a model: collecting activations from a model belongs to the layer above."""

from .activations import REDUCTIONS, Activations, reduce_tokens, token_mask
from .directions import DIRECTION_KINDS, ConceptDirection, DirectionError, load_persona_vector
from .linear import PROBE_KINDS, ProbeResult, train_diff_means_probe, train_logistic_probe, train_probe
from .sae import SAEError, load_pretrained_sae, load_sae, sae_direction
from .sae_latents import LatentActivations, LatentRanking, latent_separation
from .sae_training import SAETrainingResult, train_sae_on_activations

__all__ = [
    "REDUCTIONS", "Activations", "reduce_tokens", "token_mask",
    "DIRECTION_KINDS", "ConceptDirection", "DirectionError", "load_persona_vector",
    "PROBE_KINDS", "ProbeResult", "train_diff_means_probe", "train_logistic_probe", "train_probe",
    "SAEError", "load_pretrained_sae", "load_sae", "sae_direction",
    "LatentActivations", "LatentRanking", "latent_separation",
    "SAETrainingResult", "train_sae_on_activations",
]
