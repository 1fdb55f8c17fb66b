"""CALM: Continuous Autoregressive Language Models (Shao, Li, Meng and Zhou, 2025, arXiv 2510.27688).

A high-fidelity autoencoder compresses each chunk of K = `patch_size` tokens into one `latent_size` vector (paper
section 2). A Llama backbone reads one position per chunk, and an energy head predicts the next chunk's vector
(section 3), which the autoencoder decodes back into K tokens:

    input_ids [B, P*K] -> transformer.embed_tokens + embed_proj [B, P, d] -> transformer (Llama) [B, P, d]
        -> generative_head (+ uniform noise) [B, P, l] -> ae_model.decoder [B, P*K, a] -> argmax -> tokens

The module names follow the authors' code (`transformer`, `embed_proj`, `generative_head`, `ae_model.encoder`,
`ae_model.decoder`): they decide the checkpoint keys, so that converted weights load by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaModel, LlamaRMSNorm
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .generation_calm import CALMGenerationMixin, set_calm_generation_defaults
from .heads_calm import HEADS, LAYER_NORM_EPS
from .utils_calm import CACHE_KWARG, TAKES_CACHE_POSITION, check_input_ids, chunk_mask_of, positions_of, vocab_argmax

# The remote-code entry that sends `AutoModel` on a CALM folder to `CALMForCausalLM`.
AUTO_MODEL_ENTRY = "modeling_calm.CALMForCausalLM"

NO_LOGITS = (
    "CALM has no token logits: it predicts one continuous vector per chunk of {k} tokens, so token likelihoods "
    "(lm_eval's loglikelihood / multiple_choice tasks, output_logits, .logits) do not exist. Use generation "
    "(generate(), lm_eval's generate_until tasks) or BrierLM (calm-eval) instead."
)


# ---------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class CALMAutoencoderOutput(ModelOutput):
    """Output of `CALMAutoencoder.forward`: loss [], logits [B, P*K, V], accuracy [], mean/log_std [B, P, l]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    log_std: torch.Tensor | None = None


@dataclass
class CALMOutput(ModelOutput):
    """Output of `CALMForCausalLM.forward`.

    last_hidden_state: [B, P, d], one backbone state per chunk (the state after chunk p predicts chunk p + 1).
    loss: the training loss of the generative head (with labels).
    """

    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    if CACHE_KWARG == "cache":  # the field's name follows the installed transformers
        cache: object | None = None
    else:
        past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def logits(self) -> torch.Tensor:
        raise AttributeError(NO_LOGITS.format(k="K"))


# ---------------------------------------------------------------------------------------------------------------
# The autoencoder (paper section 2)


class AELayer(nn.Module):
    """`x + SwiGLU(RMSNorm(x))`, applied to each position independently (no attention)."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.layernorm(hidden))


class CALMEncoder(nn.Module):
    """K token ids -> the posterior (mean, log_std) of one latent vector."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_token_layers = config.num_encoder_layers // 2  # before the K token states are squeezed into one
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(config.patch_size * config.hidden_size, config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(config.hidden_size, 2 * config.latent_size)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, P*K] -> (mean, log_std), each [B, P, l]."""
        batch_size, seq_len = input_ids.shape
        num_chunks = seq_len // self.patch_size
        hidden = self.embed_tokens(input_ids.reshape(batch_size * num_chunks, self.patch_size))  # [B*P, K, a]
        if self.training:
            # As the authors' encoder (trained under bf16 autocast). Their CALM training leaves the frozen
            # autoencoder in training mode, so this also shapes the energy loss's targets.
            hidden = hidden.to(torch.bfloat16)
        for layer in self.encoder_layers[: self.num_token_layers]:
            hidden = layer(hidden)
        hidden = self.squeeze_layer(hidden.flatten(1).to(self.squeeze_layer.weight.dtype))  # [B*P, a]
        for layer in self.encoder_layers[self.num_token_layers :]:
            hidden = layer(hidden)
        latent = self.hidden_to_latent(self.norm(hidden)).reshape(batch_size, num_chunks, -1)  # [B, P, 2l]
        mean, log_std = latent.chunk(2, dim=-1)
        return mean, log_std


class CALMDecoder(nn.Module):
    """One latent vector -> K token states; the logits use the encoder's (tied) token embedding."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_chunk_layers = config.num_decoder_layers // 2  # before the chunk state is expanded to K tokens
        self.latent_to_hidden = nn.Linear(config.latent_size, config.hidden_size)
        self.decoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(config.hidden_size, config.patch_size * config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, P, l] -> token states [*, P*K, a], before the vocabulary projection."""
        return self.token_states(self.chunk_state(latents)).flatten(-3, -2)

    def chunk_state(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, l] -> [*, a]: the decoder up to `expand_layer`, one state per chunk."""
        hidden = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[: self.num_chunk_layers]:
            hidden = layer(hidden)
        return hidden

    def token_states(self, chunk_state: torch.Tensor) -> torch.Tensor:
        """chunk states [*, a] -> the states of its K tokens [*, K, a]."""
        hidden = self.expand_layer(chunk_state).unflatten(-1, (self.patch_size, -1))  # [*, K, a]
        for layer in self.decoder_layers[self.num_chunk_layers :]:
            hidden = layer(hidden)
        return self.norm(hidden)


# ---------------------------------------------------------------------------------------------------------------
# Models


class CALMPreTrainedModel(PreTrainedModel):
    config_class = CALMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "AELayer", "EnergyHeadBlock", "ResBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True  # generate(cache_implementation="static") gives the backbone fixed shapes
    # The energy loss is a mean over positions; Trainer must not rescale it by token counts.
    accepts_loss_kwargs = False

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, *args: object, **kwargs: object
    ) -> nn.Embedding:
        """Only to the same size: new tokens need an autoencoder trained with them, which resizing cannot give."""
        if new_num_tokens not in (None, self.config.vocab_size) or kwargs.get("pad_to_multiple_of") or args:
            raise NotImplementedError(
                f"CALM cannot resize its vocabulary ({self.config.vocab_size} -> {new_num_tokens}): the autoencoder "
                "maps chunks of tokens to latent vectors and back, and new tokens need an autoencoder trained with "
                "them (calm-train --stage autoencoder, then --stage lm) rather than new embedding rows."
            )
        return self.get_input_embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        head = getattr(self, "generative_head", None)  # the autoencoder has none
        if head is not None and any(module is layer for layer in head.modules()):
            head.init_layer(module)  # after transformers' default: the authors' init of the head's layers wins


class CALMAutoencoder(CALMPreTrainedModel):
    """The CALM autoencoder on its own: `encode` K tokens to a latent posterior, `decode` latents to logits."""

    config_class = CALMAutoencoderConfig
    base_model_prefix = "ae_model"
    _no_split_modules = ["AELayer"]

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__(config)
        self.patch_size = config.patch_size
        self.encoder = CALMEncoder(config)
        self.decoder = CALMDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, P*K] -> (mean, log_std), each [B, P, latent_size]."""
        check_input_ids(input_ids, self.config.vocab_size, self.patch_size)
        return self.encoder(input_ids)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, P, latent_size] -> logits [B, P*K, vocab_size]."""
        self._check_latents(latents)
        token_states = self.decoder(latents)
        return F.linear(token_states, self.vocab_weight(token_states.device))

    def decode_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, P, latent_size] -> argmax token ids [*, P*K], without holding all logits at once."""
        self._check_latents(latents)
        return self.argmax_tokens(self.decoder(latents))

    def vocab_weight(self, device: torch.device) -> torch.Tensor:
        """The decoder's output projection [V, a]: the encoder's token embedding (tied, paper section 2).

        Offloaded by accelerate, the weight stays on "meta" until its module runs, so it is then read through the
        module (a lookup of every id), which loads it."""
        weight = self.encoder.embed_tokens.weight
        if weight.device.type == "meta":
            weight = self.encoder.embed_tokens(torch.arange(weight.shape[0], device=device))
        return weight

    def argmax_tokens(self, token_states: torch.Tensor) -> torch.Tensor:
        """Decoder token states [*, a] -> argmax token ids [*] over the tied vocabulary projection."""
        flat = token_states.reshape(-1, token_states.shape[-1])  # [n, a]
        return vocab_argmax(flat, self.vocab_weight(flat.device)).reshape(token_states.shape[:-1])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CALMAutoencoderOutput:
        """Reconstruct `input_ids` [B, P*K]; with `labels` (-100 ignored), the training loss of section 2.

        In training mode input tokens are dropped to id 0 with probability `ae_dropout`, and the latent is sampled
        (`mean + std * latent_noise`, noise standard normal) and dropped out with the same probability. In eval
        mode the decoder reads the posterior mean, so `accuracy` is the deterministic reconstruction accuracy.
        """
        check_input_ids(input_ids, self.config.vocab_size, self.patch_size)
        p = self.config.ae_dropout
        encoder_ids = input_ids
        if self.training and p > 0:
            encoder_ids = input_ids.masked_fill(torch.rand(input_ids.shape, device=input_ids.device) < p, 0)
        mean, log_std = self.encoder(encoder_ids)
        latents = mean
        if self.training:
            latent_noise = torch.randn_like(mean) if latent_noise is None else latent_noise
            latents = F.dropout(mean + torch.exp(log_std) * latent_noise, p=p, training=True)
        token_states = self.decoder(latents)
        logits = F.linear(token_states, self.vocab_weight(token_states.device))
        loss = accuracy = None
        if labels is not None:
            loss = self.patch_size * F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            kl = 0.5 * (mean.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std)  # [B, P, l]
            loss = loss + self.config.kl_weight * torch.clamp(kl, min=self.config.kl_clamp).sum(-1).mean()
            accuracy = (logits.argmax(-1) == labels)[labels != -100].float().mean()
        return CALMAutoencoderOutput(loss=loss, logits=logits, accuracy=accuracy, mean=mean, log_std=log_std)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() < 2 or latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"latents must have shape [..., num_chunks, latent_size={self.config.latent_size}], "
                f"got {tuple(latents.shape)}."
            )


class CALMForCausalLM(CALMPreTrainedModel, CALMGenerationMixin):
    """CALM language model: Llama backbone over chunks, generative head, frozen autoencoder (paper section 3).

    >>> from calm_transformers.cli import DEFAULT_MODEL  # the small CALM shipped with the package (K = 4)
    >>> model = CALMForCausalLM.from_pretrained(DEFAULT_MODEL)
    >>> model(torch.randint(3, 2000, (1, 8))).last_hidden_state.shape  # one state per chunk of 4 tokens
    torch.Size([1, 2, 256])
    """

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config)
        self.patch_size = config.patch_size
        d = config.hidden_size
        self.transformer = LlamaModel(config)
        self.embed_proj = nn.Sequential(
            nn.Linear(config.patch_size * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        )
        self.generative_head = HEADS[config.head_type](config)
        self.ae_model = CALMAutoencoder(config.autoencoder_config)
        self.ae_model.requires_grad_(False)
        self.post_init()
        set_calm_generation_defaults(self.generation_config)

    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object) -> CALMForCausalLM | tuple[CALMForCausalLM, dict]:
        loaded = super().from_pretrained(*args, **kwargs)  # (model, loading info) with output_loading_info=True
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.ae_model.requires_grad_(False)  # loading replaces parameters, and with them the freeze of __init__
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args: object, **kwargs: object) -> None:
        """`PreTrainedModel.save_pretrained`; with the model code copied, `AutoModel` also loads this class (its
        `forward` returns the backbone states per chunk, as a base model's does)."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": AUTO_MODEL_ENTRY}
        super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embed_tokens = value

    def embed_chunks(self, input_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, P*K] -> one input vector per chunk [B, P, d]. Masked tokens embed to zero."""
        batch_size, seq_len = input_ids.shape
        embeds = self.transformer.embed_tokens(input_ids)  # [B, P*K, d]
        if token_mask is not None:
            embeds = embeds * token_mask.unsqueeze(-1).to(embeds.dtype)
        return self.embed_proj(embeds.reshape(batch_size, seq_len // self.patch_size, -1))  # [B, P, K*d] -> [B, P, d]

    def backbone(
        self,
        chunk_embeds: torch.Tensor,
        chunk_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, object, ModelOutput]:
        """The Llama backbone on chunk vectors [B, P, d] -> (last hidden state [B, P, d], cache, raw output).

        chunk_mask covers the past and current chunks (a `StaticCache`: all its slots). `cache_position` [P], the
        cache slots of these chunks, is passed where the installed LlamaModel takes it (transformers 4.57).
        """
        if cache_position is not None and TAKES_CACHE_POSITION:
            kwargs["cache_position"] = cache_position
        if cache is not None:
            kwargs.setdefault("use_cache", True)
        outputs = self.transformer(
            inputs_embeds=chunk_embeds,
            attention_mask=chunk_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
            return_dict=True,  # whatever config.return_dict says: forward makes the tuple, if asked
            **kwargs,
        )
        return outputs.last_hidden_state, getattr(outputs, CACHE_KWARG, None), outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: object | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        loss_noise: tuple[torch.Tensor, ...] | None = None,
        **kwargs: object,
    ) -> CALMOutput:
        """Backbone states per chunk; with `labels`, the generative head's loss. A tuple with `return_dict=False`.

        input_ids, attention_mask, labels: [B, P*K] (token level; a chunk is attended if any of its tokens is).
        With labels, the inputs are chunks 0..P-2 and the targets chunks 1..P-1; a target chunk with any label of
        -100 is skipped. `loss_noise` replaces the loss's random draws, as `generative_head.loss` takes them (the energy
        head: target draws [num_target_samples, n_targets, latent_size] and head draws [num_samples, n_targets,
        noise_size]; n_targets row-major over batch and chunk).
        `output_hidden_states` and `output_attentions` are the backbone's (None: the config's).
        """
        if input_ids is None:
            raise ValueError("CALMForCausalLM.forward needs input_ids (the model embeds whole chunks of tokens).")
        if kwargs.pop("output_logits", False):
            raise ValueError(NO_LOGITS.format(k=self.patch_size))
        # Callers that score token likelihoods (lm_eval's loglikelihood) pass any length: name the real problem too.
        check_input_ids(input_ids, self.config.vocab_size, self.patch_size, " " + NO_LOGITS.format(k=self.patch_size))
        if attention_mask is not None and attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"attention_mask has batch size {attention_mask.shape[0]}, input_ids {input_ids.shape[0]}."
            )
        # Left out when None, so that the backbone reads the config's defaults (a list of layers: transformers 5).
        wanted = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        outputs_wanted = {name: value for name, value in wanted.items() if value is not None}
        if labels is not None:
            return self._loss(input_ids, attention_mask, labels, loss_noise, **outputs_wanted)

        chunk_mask = chunk_mask_of(attention_mask, self.patch_size) if attention_mask is not None else None
        token_mask = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
        if chunk_mask is not None and position_ids is None and past_key_values is None:
            position_ids = positions_of(chunk_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache, outputs = self.backbone(
            self.embed_chunks(input_ids, token_mask),
            chunk_mask,
            position_ids,
            kwargs.pop("cache", past_key_values),
            use_cache=bool(use_cache),
            **outputs_wanted,
        )
        return CALMOutput(
            last_hidden_state=hidden,
            **{CACHE_KWARG: cache},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        loss_noise: tuple[torch.Tensor, ...] | None,
        **outputs_wanted: bool | list[int] | None,
    ) -> CALMOutput:
        """The training objective (section 3): the head's loss on the next chunk's posterior, at each chunk position."""
        batch_size, seq_len = input_ids.shape
        k, num_chunks = self.patch_size, seq_len // self.patch_size
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
            )
        if num_chunks < 2:
            raise ValueError(f"training needs at least 2 chunks ({2 * k} tokens) per row, got {seq_len}.")
        # Inputs: chunks 0..P-2; targets: chunks 1..P-1.
        inputs = input_ids[:, :-k]
        token_mask = attention_mask[:, :-k] if attention_mask is not None else None
        chunk_mask = chunk_mask_of(token_mask, k) if token_mask is not None else None
        positions = positions_of(chunk_mask) if chunk_mask is not None else None
        hidden, _, outputs = self.backbone(
            self.embed_chunks(inputs, token_mask), chunk_mask, positions, **outputs_wanted
        )

        target_ids = labels[:, k:].reshape(batch_size, num_chunks - 1, k)
        target_valid = (target_ids != -100).all(-1)  # [B, P-1]
        hidden, target_ids = hidden[target_valid], target_ids[target_valid]  # [n, d], [n, K]; row-major (batch, chunk)
        with torch.no_grad():
            mean, log_std = self.ae_model.encoder(target_ids.reshape(1, -1))  # [1, n, l]
        return CALMOutput(
            loss=self.generative_head.loss(hidden, mean[0], log_std[0], loss_noise),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# `save_pretrained` copies this code (and the files it imports) next to the weights and writes `auto_map`, so that
# saved folders load with `trust_remote_code=True` and no install.
CALMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CALMAutoencoder.register_for_auto_class("AutoModel")
