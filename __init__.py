"""calm-transformers: CALM (Continuous Autoregressive Language Models) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .evaluate_calm import brier_scores, calm_brier_scores
from .generation_calm import temperature_sampling
from .heads_calm import HEADS, energy_score
from .modeling_calm import CALMAutoencoder, CALMForCausalLM

# With the package imported, the Auto classes (and so pipeline and AutoTokenizer, which read config.json) know
# CALM without trust_remote_code. Remote-code loading never runs this file (it imports the model files alone), and
# a copy of this folder imported under another name (pytest imports a repository root with an __init__.py as a
# package) must not replace the installed classes.
if __name__ == "calm_transformers":
    AutoConfig.register(CALMConfig.model_type, CALMConfig, exist_ok=True)
    AutoConfig.register(CALMAutoencoderConfig.model_type, CALMAutoencoderConfig, exist_ok=True)
    AutoModelForCausalLM.register(CALMConfig, CALMForCausalLM, exist_ok=True)
    AutoModel.register(CALMAutoencoderConfig, CALMAutoencoder, exist_ok=True)
    AutoModel.register(CALMConfig, CALMForCausalLM, exist_ok=True)  # its forward returns the backbone states

__all__ = [
    "HEADS",
    "CALMAutoencoder",
    "CALMAutoencoderConfig",
    "CALMConfig",
    "CALMForCausalLM",
    "brier_scores",
    "calm_brier_scores",
    "energy_score",
    "temperature_sampling",
]
