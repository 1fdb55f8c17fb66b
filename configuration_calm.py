"""Configurations of CALM (Continuous Autoregressive Language Models) and of its autoencoder.

One `config.json` describes the whole model: `CALMConfig` holds the Llama backbone fields, the energy
head fields and the autoencoder's config nested under `autoencoder_config`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The Llama 3 vocabulary plus the `[PAD]` token the released models add.
LLAMA3_VOCAB_SIZE = 128257
LLAMA3_BOS, LLAMA3_EOS, LLAMA3_PAD = 128000, 128001, 128256


# The generative heads (`CALMConfig.head_type`), and the authors' classes with each, as their checkpoints'
# `architectures` name them.
HEAD_TYPES = ("energy", "diffusion", "flow")
AUTHORS_ARCHITECTURES = ("EnergyTransformer", "DiffusionTransformer", "FlowTransformer")


def check_model_type(config_class: type[PretrainedConfig], config_dict: dict[str, Any]) -> None:
    """Refuse a config of another kind of model, so that no CALM is built with random weights from, say, a Llama
    folder. `model_type` decides; without it (the authors' checkpoints have none), `architectures`."""
    model_type = config_dict.get("model_type") or None
    architectures = config_dict.get("architectures") or []
    if set(architectures) & set(AUTHORS_ARCHITECTURES) and model_type in (None, *HEAD_TYPES):
        raise ValueError(
            f"this is a checkpoint of the authors' code ({', '.join(architectures)}), not a {config_class.__name__}: "
            "convert it first with calm-convert."
        )
    if model_type not in (None, config_class.model_type):
        what = f"model_type {model_type!r}" + (f", {', '.join(architectures)}" if architectures else "")
        use = (
            "load a CALM language model with CALMForCausalLM, its autoencoder with CALMAutoencoder"
            if model_type in (CALMConfig.model_type, CALMAutoencoderConfig.model_type)
            else "load it with transformers' AutoModelForCausalLM (calm-eval scores such models as they are)"
        )
        raise ValueError(f"this is not a {config_class.__name__} ({what}): {use}.")


def _check_positive(config: PretrainedConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


class CALMAutoencoderConfig(PretrainedConfig):
    """The autoencoder that maps `patch_size` tokens to one `latent_size` vector and back (paper section 2)."""

    model_type = "calm_autoencoder"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CALMAutoencoderConfig:
        check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def __init__(
        self,
        vocab_size: int = LLAMA3_VOCAB_SIZE,
        hidden_size: int = 512,
        intermediate_size: int = 1280,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        latent_size: int = 128,
        patch_size: int = 4,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        ae_dropout: float = 0.15,
        kl_weight: float = 1e-3,
        kl_clamp: float = 0.5,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 2048,
        pad_token_id: int | None = LLAMA3_PAD,
        bos_token_id: int | None = LLAMA3_BOS,
        eos_token_id: int | list[int] | None = LLAMA3_EOS,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.latent_size = latent_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.ae_dropout = ae_dropout
        self.kl_weight = kl_weight
        self.kl_clamp = kl_clamp
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        # `mlp_bias` is read by the SwiGLU MLP; the autoencoder never has MLP biases.
        kwargs.pop("mlp_bias", None)
        self.mlp_bias = False
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size"))
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"CALMAutoencoderConfig.{name} must be a non-negative integer.")
        if not 0.0 <= ae_dropout < 1.0:
            raise ValueError(f"CALMAutoencoderConfig.ae_dropout must be in [0, 1), got {ae_dropout}.")


class CALMConfig(PretrainedConfig):
    """CALM: a Llama backbone over chunks of `patch_size` tokens, an energy head and a frozen autoencoder.

    The defaults are CALM-M (the paper's Table 1). The Llama fields have transformers' `LlamaConfig` meaning and
    are read by `LlamaModel` directly. `max_position_embeddings` counts chunks, not tokens.

    `head_type` picks the generative head: "energy" (the paper's) or the authors' "diffusion" / "flow" (their
    ablation). Diffusion: ancestral sampling of the 1000-step cosine process respaced to `diffusion_steps` (IDDPM);
    `diffusion_temperature` scales its per-step noise (the authors' sampler argument, left at 1); `diffusion_t0_nll`:
    at t = 0 the variational term is the discretized 8-bit image likelihood, as the authors' (False: the Gaussian KL,
    as at t > 0). Flow: `flow_steps` steps of `flow_solver` ("midpoint", 2 network passes a step; "euler" is the
    authors' unused branch, which ran 20 steps); `flow_floor_time`: the network embeds floor(1000 t), as the authors'
    (False: 1000 t unrounded).
    """

    model_type = "calm"
    sub_configs = {"autoencoder_config": CALMAutoencoderConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CALMConfig:
        check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def __init__(
        self,
        vocab_size: int = LLAMA3_VOCAB_SIZE,
        hidden_size: int = 1024,
        intermediate_size: int = 2752,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        patch_size: int = 4,
        latent_size: int = 128,
        noise_size: int = 64,
        num_mlp_layers: int = 4,
        num_samples: int = 8,
        num_target_samples: int = 100,
        beta: float = 1.0,
        head_type: str = "energy",
        diffusion_steps: int = 100,
        diffusion_temperature: float = 1.0,
        diffusion_t0_nll: bool = True,
        flow_steps: int = 10,
        flow_solver: str = "midpoint",
        flow_floor_time: bool = True,
        autoencoder_config: dict | CALMAutoencoderConfig | None = None,
        pad_token_id: int | None = LLAMA3_PAD,
        bos_token_id: int | None = LLAMA3_BOS,
        eos_token_id: int | list[int] | None = LLAMA3_EOS,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.pretraining_tp = 1
        self.patch_size = patch_size
        self.latent_size = latent_size
        self.noise_size = noise_size
        self.num_mlp_layers = num_mlp_layers
        self.num_samples = num_samples
        self.num_target_samples = num_target_samples
        self.beta = beta
        self.head_type = head_type
        self.diffusion_steps = diffusion_steps
        self.diffusion_temperature = diffusion_temperature
        self.diffusion_t0_nll = diffusion_t0_nll
        self.flow_steps = flow_steps
        self.flow_solver = flow_solver
        self.flow_floor_time = flow_floor_time

        rope_theta, rope_scaling, self.rope_parameters = _rope_fields(
            rope_theta, rope_scaling, kwargs.pop("rope_parameters", None)
        )
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # 5.x warns on this legacy field; only 4.57 needs it, and only when set
            self.rope_scaling = rope_scaling
        if autoencoder_config is None:  # the released autoencoder's shape, with this model's vocabulary and chunks
            autoencoder_config = CALMAutoencoderConfig(
                vocab_size=vocab_size, patch_size=patch_size, latent_size=latent_size,
                pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            )  # fmt: skip
        elif isinstance(autoencoder_config, dict):
            autoencoder_config = CALMAutoencoderConfig(**autoencoder_config)
        self.autoencoder_config = autoencoder_config
        self._validate()  # before the base class, whose own checks give less helpful messages

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        _check_positive(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "patch_size",
                "latent_size",
                "noise_size",
                "num_mlp_layers",
                "num_samples",
                "num_target_samples",
                "diffusion_steps",
                "flow_steps",
            ),
        )
        if self.head_dim * self.num_attention_heads != self.hidden_size and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); change one of them or set head_dim."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}.")
        if self.num_samples < 2 and self.head_type == "energy":
            raise ValueError("num_samples (energy-loss head samples N) must be at least 2: the score compares pairs.")
        if self.diffusion_steps > 1000:
            raise ValueError(
                f"diffusion_steps ({self.diffusion_steps}) respaces the 1000 training timesteps: at most 1000."
            )
        if self.flow_solver not in ("midpoint", "euler"):
            raise ValueError(f"flow_solver must be 'midpoint' or 'euler', got {self.flow_solver!r}.")
        for name in ("diffusion_t0_nll", "flow_floor_time"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        temperature = self.diffusion_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"diffusion_temperature must be a number >= 0, got {temperature!r}.")
        if not 0.0 < self.beta < 2.0:
            raise ValueError(f"beta must be in (0, 2) for the energy score to be strictly proper, got {self.beta}.")
        ae = self.autoencoder_config
        for name in ("patch_size", "latent_size", "vocab_size"):
            if getattr(ae, name) != getattr(self, name):
                raise ValueError(
                    f"The autoencoder's {name} ({getattr(ae, name)}) differs from the language model's "
                    f"({getattr(self, name)}); they must agree. Fix autoencoder_config.{name} or CALMConfig.{name}."
                )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Always write the RoPE base both ways (4.57 and 5.x read different fields).
        output["rope_theta"] = self.rope_theta
        output["rope_parameters"] = dict(self.rope_parameters)
        return output


def _rope_fields(
    rope_theta: float, rope_scaling: dict | None, rope_parameters: dict | None
) -> tuple[float, dict | None, dict]:
    """RoPE written both ways: transformers 4.57 reads `rope_theta` / `rope_scaling`, 5.x reads `rope_parameters`
    (a saved 5.x config may carry only that). Returns (rope_theta, rope_scaling, rope_parameters)."""
    if rope_parameters is not None and "rope_theta" in rope_parameters:
        rope_theta = rope_parameters["rope_theta"]
    scaled = rope_parameters is not None and rope_parameters.get("rope_type", "default") != "default"
    if rope_scaling is None and scaled:
        rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": float(rope_theta)}
    if "type" in parameters:  # legacy spelling of rope_type
        parameters["rope_type"] = parameters.pop("type")
    return float(rope_theta), rope_scaling, parameters


# `save_pretrained` writes `auto_map` for these, so that saved folders load with `trust_remote_code=True`. Registered
# here, where the classes are defined: remote code may load this module twice (for AutoConfig and for the model), and
# each copy must register its own classes.
CALMConfig.register_for_auto_class()
CALMAutoencoderConfig.register_for_auto_class()
