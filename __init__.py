from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .modeling_calm import CALMAutoencoder, CALMForCausalLM
