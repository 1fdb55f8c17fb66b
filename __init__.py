"""calm-transformers: CALM (Continuous Autoregressive Language Models) for Hugging Face transformers."""

from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .generation_calm import temperature_sampling
from .modeling_calm import CALMAutoencoder, CALMForCausalLM, brier_scores, energy_score

__all__ = [
    "CALMAutoencoder",
    "CALMAutoencoderConfig",
    "CALMConfig",
    "CALMForCausalLM",
    "brier_scores",
    "energy_score",
    "temperature_sampling",
]
