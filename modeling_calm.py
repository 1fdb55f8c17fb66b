"""CALM: Continuous Autoregressive Language Models (Shao et al., 2025, arXiv 2510.27688).

A high-fidelity autoencoder compresses each chunk of K = `patch_size` tokens into one `latent_size` vector.
A Llama backbone reads one position per chunk and an energy head predicts the next chunk's vector, which
the autoencoder decodes back into K tokens:

    input_ids [B, P*K] -> embed + embed_proj [B, P, d] -> LlamaModel [B, P, d]
        -> generative_head (+ noise) [B, P, l] -> ae_model.decoder -> logits [B, P*K, V] -> argmax

Module names follow the authors' code (`transformer`, `embed_proj`, `generative_head`, `ae_model.encoder`,
`ae_model.decoder`) so that their weights load by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaModel, LlamaRMSNorm
from transformers.utils import ModelOutput

from .configuration_calm import CALMAutoencoderConfig, CALMConfig
from .generation_calm import CALM_GENERATION_DEFAULTS, CALMGenerationMixin

try:  # transformers 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.57
    init = nn.init

# The KV-cache keyword of LlamaModel.forward: `cache` in recent 5.x, `past_key_values` before.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# transformers 4.57's LlamaModel takes the cache slots to write as `cache_position`; 5.x caches count them.
TAKES_CACHE_POSITION = "cache_position" in inspect.signature(LlamaModel.forward).parameters

# Brier-n is reported for n-grams of 1..4 tokens (BrierLM is their geometric mean).
BRIER_MAX_N = 4


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, patch_size: int | None = None) -> None:
    """Raise a clear error for ids a CALM model cannot read. `patch_size` set: require whole chunks."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape [batch_size, sequence_length], got {tuple(input_ids.shape)}; "
            "for a single sequence use input_ids.unsqueeze(0)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if patch_size is not None and input_ids.shape[1] % patch_size != 0:
        raise ValueError(
            f"input length {input_ids.shape[1]} is not a multiple of patch_size={patch_size}: the model reads whole "
            f"chunks of {patch_size} tokens. Pad the input to a multiple of {patch_size} (and mask the padding with "
            "attention_mask), or use generate(), which aligns prompts of any length."
        )
    if input_ids.numel() > 0:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range [0, {vocab_size}): the tokenizer does not match this model "
                f"(vocab_size={vocab_size}). Use the tokenizer saved with the model."
            )


def energy_score(
    samples: torch.Tensor,
    mean: torch.Tensor,
    log_std: torch.Tensor,
    num_target_samples: int = 100,
    beta: float = 1.0,
    target_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monte-Carlo energy score of model samples against the Gaussian posterior of the target (spec section 3).

    samples: [N, *, l] head samples; mean, log_std: [*, l]; target_noise: [M, *, l] standard normal draws.
    Returns [*]: `sum_{i!=j} |x_i - x_j|^beta / (N(N-1)) - 2 sum_{i,j} |x_i - y_j|^beta / (N M)` (higher is better).
    """
    n = samples.shape[0]
    if target_noise is None:
        target_noise = torch.randn((num_target_samples, *mean.shape), device=mean.device, dtype=mean.dtype)
    targets = mean + torch.exp(log_std) * target_noise  # [M, *, l]

    # The diagonal i == j is zero, so summing the full matrix gives the sum over i != j.
    pairwise = torch.linalg.norm(samples.unsqueeze(1) - samples.unsqueeze(0), dim=-1).pow(beta)  # [N, N, *]
    spread = pairwise.sum(dim=(0, 1)) / (n * (n - 1))
    to_target = torch.linalg.norm(samples.unsqueeze(1) - targets.unsqueeze(0), dim=-1).pow(beta)  # [N, M, *]
    return spread - 2 * to_target.mean(dim=(0, 1))


def brier_scores(
    sample_a: torch.Tensor, sample_b: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Brier-1..4 from two independent samples per position (spec section 5).

    sample_a, sample_b, targets: [n_positions, L] token ids with L >= 4, the tokens that follow each position.
    valid: optional [n_positions, L] bool, False where a target token does not exist; an n-gram counts only where
    its n target tokens exist. Returns [4]: the mean of `1{a=y} + 1{b=y} - 1{a=b}` over positions, per n-gram.
    """
    scores = []
    for n in range(1, BRIER_MAX_N + 1):
        a_hit = (sample_a[:, :n] == targets[:, :n]).all(-1)
        b_hit = (sample_b[:, :n] == targets[:, :n]).all(-1)
        collide = (sample_a[:, :n] == sample_b[:, :n]).all(-1)
        score = a_hit.float() + b_hit.float() - collide.float()
        keep = valid[:, :n].all(-1) if valid is not None else torch.ones_like(a_hit)
        scores.append(score[keep].mean() if keep.any() else score.new_tensor(float("nan")))
    return torch.stack(scores)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch helpers, present since 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Integer types of the float types' widths: the bits of positive floats order as these integers do.
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits_amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x.amax(dim)`, reduced on x's bits as integers where that gives the same maxima (all of them positive: the
    bits of positive floats order as integers do). On CPU an int16 reduction is ~4x faster than a bf16 one."""
    bits = x.view(_SAME_WIDTH_INT[x.dtype]).amax(dim)
    if bool((bits <= 0).any()):  # a maximum <= +0 (negative floats order backwards as integers): compare floats
        return x.amax(dim)
    return bits.view(x.dtype)


def _run_amax(scores: torch.Tensor, run: int) -> torch.Tensor:
    """scores [t, c] -> the maxima of each run of `run` consecutive rows, [ceil(t / run), c]."""
    whole = scores.shape[0] // run * run
    maxima = [scores[:whole].unflatten(0, (-1, run)).amax(1)] if whole else []
    if whole < scores.shape[0]:
        maxima.append(scores[whole:].amax(0, keepdim=True))
    return torch.cat(maxima) if len(maxima) > 1 else maxima[0]


def keep_first_maximum(
    best_value: torch.Tensor,
    best_index: torch.Tensor,
    columns: torch.Tensor,
    logits: torch.Tensor,
    start: int,
    run: int = 64,
) -> None:
    """Update a running argmax in place with logits [block, c]: the scores of the vocabulary block at `start` for the
    states `columns` [c] (their indices into best_value and best_index).

    Blocks come in token order and only a strictly greater value replaces the best: on ties the lower id stays.
    Each column's maximum is reduced in runs of `run` tokens (along the contiguous rows of the block: fast); only the
    columns whose best score this block improves (about ln(blocks) of the blocks per column) look for the first
    maximum, inside the first run that reaches it. The reductions run on the logits' bits as integers where every
    maximum is positive (equal positive floats have equal bits, so the first maximum is the same).
    """
    bits = logits.view(_SAME_WIDTH_INT[logits.dtype])
    run_max = _run_amax(bits, run)  # [runs, c]
    value = run_max.amax(0)  # [c]
    if bool((value > 0).all()):
        ordered, best = bits, value.view(logits.dtype)
    else:  # a maximum <= +0: negative floats order backwards as integers, so compare floats
        ordered, run_max = logits, _run_amax(logits, run)
        value = best = run_max.amax(0)
    improved = (best > best_value[columns]).nonzero().squeeze(-1)  # [m]
    if not len(improved):
        return
    first_run = (run_max[:, improved] == value[improved]).to(torch.uint8).argmax(0)  # [m]: argmax, the first
    # The first run's rows; past the block's end the last row repeats, after its first occurrence.
    rows = (first_run[:, None] * run + torch.arange(run, device=logits.device)).clamp(max=logits.shape[0] - 1)
    offset = ordered[rows, improved[:, None]].max(-1).indices  # [m]; max: the first maximum
    best_value[columns[improved]] = best[improved]
    best_index[columns[improved]] = start + first_run * run + offset


def _cpu_vocab_block(num_rows: int) -> int:
    """`blocked_argmax`'s vocabulary block on CPU for num_rows states: about 2^24 logits, a power of two tokens."""
    return 2 ** ((2**24 // max(1, num_rows)).bit_length() - 1)


def _matmul_operand(states_t: torch.Tensor) -> torch.Tensor:
    """states_t [a, c] as `blocked_argmax`'s second matmul operand: contiguous, and on CPU in bf16 with more than 64
    columns padded with zeros to a multiple of 32. The bf16 matrix-unit kernels handle a last, partial group of 32
    columns slowly: 128257 x 512 by 200 columns took 12.6 ms, by 224 columns 10.3 ms (this project's CPU, oneDNN).
    """
    hidden_size, columns = states_t.shape
    if states_t.device.type != "cpu" or states_t.dtype != torch.bfloat16 or columns <= 64 or columns % 32 == 0:
        return states_t.contiguous()
    padded = states_t.new_zeros(hidden_size, -(-columns // 32) * 32)
    padded[:, :columns] = states_t
    return padded


def vocab_logits(weight: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """weight [V, a], states [n, a] -> logits `weight @ states.T` [V, n], one state by `torch.mv` (a bf16 one-column
    matmul is slow on CPU: 9.8 vs 6.5 ms for CALM-M's 128257 x 512 projection here, with the same logits)."""
    if states.shape[0] == 1:
        return torch.mv(weight, states[0]).unsqueeze(1)
    return weight @ states.T


@torch.no_grad()
def blocked_argmax(
    states: torch.Tensor, weight: torch.Tensor, vocab_block: int | None = None, rows_per_matmul: int = 2048
) -> torch.Tensor:
    """argmax_v weight[v] . states[i] -> token ids [n] (the first maximum on ties, as `argmax`); states [n, a].

    The logits are computed as `weight @ states.T` (the large weight as the matmul's first operand: on CPU a call
    costs extra in proportion to its second operand, as if that were repacked every time), vocab_block x
    rows_per_matmul at a time into one reused buffer, and reduced with a running maximum (`keep_first_maximum`). On
    CPU the default vocab_block holds about 2^24 logits: all 128257 tokens of CALM-M for up to 128 rows (T = 1
    decodes one chunk per sequence), 65536 tokens for 200 rows, 8192 for 1600; large enough that the per-block calls
    cost little, small enough to avoid an argmax over all [V, rows] logits of a pool (more costly than the matmul
    behind them). By default up to 2^20 logits (one chunk of CALM-M, a small model) are reduced at once with `max`:
    the block's calls cost ~0.1 ms, 3% of a T = 1 step of the shipped tiny model.
    """
    num_rows, vocab_size = states.shape[0], weight.shape[0]
    if vocab_block is None and num_rows * vocab_size <= 2**20:  # few logits: one `max` costs less than the blocks
        return vocab_logits(weight, states).max(0).indices  # max: the first maximum on ties, as argmax
    if vocab_block is None and states.device.type == "cpu":
        vocab_block = _cpu_vocab_block(min(num_rows, rows_per_matmul))
    vocab_block = min(vocab_block or vocab_size, vocab_size)
    best_value = states.new_full((num_rows,), float("-inf"))
    best_index = torch.zeros(num_rows, dtype=torch.long, device=states.device)
    for first in range(0, num_rows, rows_per_matmul):
        columns = torch.arange(first, min(first + rows_per_matmul, num_rows), device=states.device)
        states_t = _matmul_operand(states[first : first + rows_per_matmul].T)  # [a, c + padding]
        buffer = states.new_empty(vocab_block, states_t.shape[1])  # reused: no large allocation per block
        for start in range(0, vocab_size, vocab_block):
            block = weight[start : start + vocab_block]
            logits = torch.mm(block, states_t, out=buffer[: len(block)])[:, : len(columns)]  # [block, c]
            keep_first_maximum(best_value, best_index, columns, logits, start)
    return best_index


# Below this vocabulary size the screen's per-block work costs more than the float32 matmuls it saves (200 rows,
# random weights, this project's CPU: 65536 tokens 47 vs 52 ms, 16384 tokens 13.9 vs 12.6 ms).
SCREEN_MIN_VOCAB = 32768


def screened_argmax(
    states: torch.Tensor,
    weight: torch.Tensor,
    screen: torch.Tensor,
    max_row_norm: float,
    vocab_block: int = 1024,
    rows_per_matmul: int = 2048,
) -> torch.Tensor:
    """The tokens of `blocked_argmax` for float32 `weight` [V, a] and `states` [n, a], mostly computed in bf16.

    `screen` is weight in bf16. Its scores differ from the float32 ones by at most
    err = (4u + 8u^2 + 2 a 2^-24) max_v |w_v| |h|, with u = 2^-8 (both operands and the result rounded to bf16,
    fp32 accumulation). Every token of a vocab_block whose best bf16 score is below (the row's best bf16 score -
    2 err) scores below the row's bf16 winner in float32, so the argmax lies in the other blocks, which are scored
    again in float32 as in `blocked_argmax`. With bf16 matrix units (AMX) the screen is ~4x faster than float32.
    """
    num_rows, hidden_size = states.shape
    u = 2.0**-8
    err = (4 * u + 8 * u * u + 2 * hidden_size * 2.0**-24) * max_row_norm * states.norm(dim=-1)  # [n]
    starts = range(0, weight.shape[0], vocab_block)
    block_max = states.new_empty(len(starts), num_rows)  # [blocks, n]: best bf16 score per vocabulary block
    for first in range(0, num_rows, rows_per_matmul):
        rows = states[first : first + rows_per_matmul].to(torch.bfloat16).T  # [a, r]
        for b, start in enumerate(starts):
            block_max[b, first : first + rows.shape[1]] = bits_amax(screen[start : start + vocab_block] @ rows, 0)
    if not bool(torch.isfinite(block_max).all()):  # inf / nan scores: no bound holds
        return blocked_argmax(states, weight, rows_per_matmul=rows_per_matmul)
    candidate = block_max >= block_max.amax(0) - 2 * err  # [blocks, n]

    best_value = states.new_full((num_rows,), float("-inf"))
    best_index = torch.zeros(num_rows, dtype=torch.long, device=states.device)
    for b in candidate.any(-1).nonzero().squeeze(-1).tolist():  # in token order: ties go to the lower id
        rows = candidate[b].nonzero().squeeze(-1)
        logits = weight[starts[b] : starts[b] + vocab_block] @ states[rows].T  # [block, r], as in blocked_argmax
        keep_first_maximum(best_value, best_index, rows, logits, starts[b])
    return best_index


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
    loss: the energy loss (with labels). brier_scores: [4], Brier-1..4 (with labels, in eval mode).
    """

    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    if CACHE_KWARG == "cache":  # the field's name follows the installed transformers
        cache: object | None = None
    else:
        past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    brier_scores: torch.Tensor | None = None


class FewRowLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) with a faster CPU path for few rows in bf16, as in generation.

    CPU bf16 matmuls repack their second operand on every call, and `F.linear` makes that the weight. For up to 128
    rows and a weight of at least 2^20 elements the weight goes first instead: `weight @ x.T`, a matrix-vector
    product for one row. At CALM-M's shapes on this project's CPU that is 20-35% faster per layer when the weights
    come from memory, as in a generation step (timing script); smaller weights stay in cache, where `F.linear` is
    faster. Same products, other summation order: the bf16 results may differ from `F.linear` in the last bit.
    Every `nn.Linear` of a CALM model is one of these (`CALMPreTrainedModel.post_init`), the Llama backbone's too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, self.in_features)
        weight_first = (
            rows <= 128
            and self.weight.numel() >= 2**20  # smaller weights stay in cache (2 MiB of bf16: a core's L2 here)
            and x.is_cpu
            and x.dtype == self.weight.dtype == torch.bfloat16
            and x.dim() > 0
            and x.shape[-1] == self.in_features  # otherwise F.linear's error names the shapes
        )
        if not weight_first:
            return F.linear(x, self.weight, self.bias)
        if rows == 1:
            vector = x.reshape(-1)
            out = torch.mv(self.weight, vector) if self.bias is None else torch.addmv(self.bias, self.weight, vector)
            return out.view(*x.shape[:-1], self.out_features)
        flat = x.reshape(rows, self.in_features)  # [n, in]
        out = self.weight @ flat.T if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat.T)
        # Contiguous, as F.linear's: later matmuls on a transposed view can copy their weight per batch entry.
        return out.T.contiguous().reshape(*x.shape[:-1], self.out_features)  # [*, out]


class AELayer(nn.Module):
    """`x + SwiGLU(RMSNorm(x))`, applied to each position independently (no attention)."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.layernorm(hidden))


class CALMEncoder(nn.Module):
    """K token ids -> posterior (mean, log_std) of one latent vector."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_stage_layers = config.num_encoder_layers // 2
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(config.patch_size * config.hidden_size, config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(config.hidden_size, 2 * config.latent_size)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len = input_ids.shape
        num_chunks = seq_len // self.patch_size
        hidden = self.embed_tokens(input_ids.reshape(batch_size * num_chunks, self.patch_size))  # [B*P, K, a]
        if self.training:
            # As the authors' encoder does (it trains under bf16 autocast); this also shapes the CALM energy-loss
            # targets, since their CALM training leaves the frozen autoencoder in training mode.
            hidden = hidden.to(torch.bfloat16)
        for layer in self.encoder_layers[: self.num_stage_layers]:
            hidden = layer(hidden)
        hidden = self.squeeze_layer(hidden.flatten(1).to(self.squeeze_layer.weight.dtype))  # [B*P, a]
        for layer in self.encoder_layers[self.num_stage_layers :]:
            hidden = layer(hidden)
        latent = self.hidden_to_latent(self.norm(hidden)).reshape(batch_size, num_chunks, -1)  # [B, P, 2l]
        mean, log_std = latent.chunk(2, dim=-1)
        return mean, log_std


class CALMDecoder(nn.Module):
    """One latent vector -> K hidden states; the logits use the encoder's (tied) token embedding."""

    def __init__(self, config: CALMAutoencoderConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_stage_layers = config.num_decoder_layers // 2
        self.latent_to_hidden = nn.Linear(config.latent_size, config.hidden_size)
        self.decoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(config.hidden_size, config.patch_size * config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, P, l] -> hidden states [*, P*K, a], before the vocabulary projection."""
        return self.token_states(self.chunk_state(latents)).flatten(-3, -2)

    def chunk_state(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, l] -> [*, a]: the decoder up to `expand_layer`, one state per chunk."""
        hidden = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[: self.num_stage_layers]:
            hidden = layer(hidden)
        return hidden

    def token_states(self, chunk_state: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """chunk states [*, a] -> the states [*, n, a] of the tokens at `positions` (default: all K) of each chunk.

        The layers after `expand_layer` act on each token alone, so some tokens cost their slice of `expand_layer`
        and their share of the rest: generation decodes the candidates of a pool token by token, and stops where
        their prefixes differ.
        """
        size = chunk_state.shape[-1]
        start, stop, _ = positions.indices(self.patch_size)
        rows = slice(start * size, stop * size)  # expand_layer's output is the K token states, in order
        hidden = F.linear(chunk_state, self.expand_layer.weight[rows], self.expand_layer.bias[rows])
        hidden = hidden.unflatten(-1, (stop - start, size))
        for layer in self.decoder_layers[self.num_stage_layers :]:
            hidden = layer(hidden)
        return self.norm(hidden)


class MLPBlock(nn.Module):
    """Residual block of the energy head: the noise stream `x` is updated, conditioned on the hidden state `y`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size),
        )
        self.down_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [*, N, d], y [*, N or 1, d] -> [*, N, d]. `linears[0]` acts on cat([in_ln(x), y])."""
        first, d = self.linears[0], x.shape[-1]
        if y.shape == x.shape:
            hidden = first(torch.cat([self.in_ln(x), y], dim=-1))
        else:  # y is shared by N samples: its half of `linears[0]` is applied once per row, not N times
            hidden = F.linear(self.in_ln(x), first.weight[:, :d], first.bias) + F.linear(y, first.weight[:, d:])
        gate, value = self.linears[1:](hidden).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * value)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, latent_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, latent_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class MLPGenerator(nn.Module):
    """The energy head: one forward pass maps (hidden state, uniform noise) to one latent sample."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, d)
        self.hidden_embd = nn.Linear(d, d)
        self.norm_noise = nn.LayerNorm(d, eps=1e-6)
        self.norm_hidden = nn.LayerNorm(d, eps=1e-6)
        self.mlp_blocks = nn.ModuleList(MLPBlock(d) for _ in range(config.num_mlp_layers))
        self.final_layer = FinalLayer(d, config.latent_size)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [*, d] and noise [*, noise_size] -> [*, l]; hidden's leading dims may be 1 where noise's are not."""
        x = self.norm_noise(self.noise_embd(noise))
        y = self.norm_hidden(self.hidden_embd(hidden))
        for block in self.mlp_blocks:
            x = block(x, y)
        return self.final_layer(x)

    def sample(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        """hidden [*, d] -> one latent sample [*, l] per row, or num_samples of them, [*, num_samples, l] (the
        hidden state's part of the head computed once per row). `noise` [*, (num_samples,) noise_size] is uniform
        in [-0.5, 0.5); drawn from `generator` when None."""
        samples = hidden.shape[:-1] if num_samples is None else (*hidden.shape[:-1], num_samples)
        shape = (*samples, self.noise_size)
        if num_samples is not None:
            hidden = hidden.unsqueeze(-2)  # [*, 1, d]: broadcasts against the samples' noise
        if noise is None:
            noise = torch.rand(shape, generator=generator, device=hidden.device, dtype=hidden.dtype) - 0.5
        elif noise.shape != shape:
            raise ValueError(
                f"noise must have shape {shape} (hidden's leading dims{', num_samples' if num_samples else ''}, "
                f"noise_size), got {tuple(noise.shape)}."
            )
        return self(hidden, noise.to(hidden.dtype))


class CALMPreTrainedModel(PreTrainedModel):
    config_class = CALMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "AELayer", "MLPBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    _supports_cache_class = True
    # The energy loss is a mean over positions; Trainer must not rescale it by token counts.
    accepts_loss_kwargs = False

    def post_init(self) -> None:
        for module in self.modules():  # the backbone's and the autoencoder's Llama layers too
            if type(module) is nn.Linear:
                module.__class__ = FewRowLinear
        super().post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MLPGenerator):
            # The authors zero the head's last projection, so that training starts from predicting 0.
            init.zeros_(module.final_layer.linears[-1].weight)
            init.zeros_(module.final_layer.linears[-1].bias)


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

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> CALMAutoencoder:
        # `.to()`, `.cuda()`, `.half()` and the like: values derived from the old weight (a 131 MB bf16 screen for
        # CALM-M) would otherwise stay in memory until the next pool decode; they are recomputed on demand.
        self.__dict__.pop("_projection_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, P*K] -> (mean, log_std), each [B, P, latent_size]."""
        check_input_ids(input_ids, self.config.vocab_size, self.patch_size)
        return self.encoder(input_ids)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, P, latent_size] -> logits [B, P*K, vocab_size]."""
        self._check_latents(latents)
        return F.linear(self.decoder(latents), self.encoder.embed_tokens.weight)

    def decode_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [*, P, latent_size] -> argmax token ids [*, P*K], without materialising all logits at once."""
        self._check_latents(latents)
        return self.argmax_tokens(self.decoder(latents))

    def argmax_tokens(
        self, hidden: torch.Tensor, vocab_block: int | None = None, rows_per_matmul: int = 2048
    ) -> torch.Tensor:
        """Decoder states [*, a] -> argmax token ids [*] (the first maximum on ties, as `argmax`).

        `blocked_argmax`, or for more than 64 rows (a candidate pool) of a float32 model with a vocabulary of at
        least SCREEN_MIN_VOCAB tokens on a CPU with bf16 matrix units `screened_argmax`: the same tokens, most of the
        work in bf16 (README, Speed: about 2x faster for 1600 rows at CALM-M shapes; slower for few rows or small
        vocabularies).
        `vocab_block` and `rows_per_matmul` set their blocking (None: their default).
        """
        flat = hidden.reshape(-1, hidden.shape[-1])  # [n, a]
        weight = self.encoder.embed_tokens.weight  # [V, a], tied with the encoder's embedding
        pool = flat.shape[0] > 64 and weight.shape[0] >= SCREEN_MIN_VOCAB
        if pool and weight.dtype == torch.float32 and flat.device.type == "cpu" and cpu_has_fast_bf16():
            screen = self._cached("bf16_weight", lambda: weight.detach().to(torch.bfloat16))
            tokens = screened_argmax(flat, weight, screen, self.max_row_norm(), vocab_block or 1024, rows_per_matmul)
        else:
            tokens = blocked_argmax(flat, weight, vocab_block, rows_per_matmul)
        return tokens.reshape(hidden.shape[:-1])

    def max_row_norm(self) -> float:
        """max_v |w_v| of the output projection (the tied embedding), for error bounds on its scores."""

        def compute() -> float:  # in blocks: no fp32 copy of the whole weight (250 MiB for the Llama 3 vocabulary)
            blocks = self.encoder.embed_tokens.weight.detach().split(4096)
            dtype = torch.promote_types(blocks[0].dtype, torch.float32)  # bf16 / fp16 norms in float32 (no overflow)
            return max(torch.linalg.vector_norm(b, dim=-1, dtype=dtype).max().item() for b in blocks)

        return self._cached("max_row_norm", compute)

    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """A value derived from the output projection, kept until the weight changes (in place, or replaced)."""
        weight = self.encoder.embed_tokens.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cache = self.__dict__.setdefault("_projection_cache", {})  # not a module attribute: not saved, not moved
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, compute())
        return cache[name][1]

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() < 2 or latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"latents must have shape [..., num_chunks, latent_size={self.config.latent_size}], "
                f"got {tuple(latents.shape)}."
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CALMAutoencoderOutput:
        """Reconstruct `input_ids` [B, P*K]. With `labels` (-100 ignored), the training loss of spec section 2.

        In training mode: input tokens are dropped to id 0 with probability `ae_dropout`, the latent is sampled
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
            if latent_noise is None:
                latent_noise = torch.randn_like(mean)
            latents = F.dropout(mean + torch.exp(log_std) * latent_noise, p=p, training=True)
        logits = F.linear(self.decoder(latents), self.encoder.embed_tokens.weight)

        loss = accuracy = None
        if labels is not None:
            valid = labels != -100
            reconstruction = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            kl = 0.5 * (mean.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std)  # [B, P, l]
            kl = torch.clamp(kl, min=self.config.kl_clamp).sum(-1).mean()
            loss = self.patch_size * reconstruction + self.config.kl_weight * kl
            accuracy = (logits.argmax(-1) == labels)[valid].float().mean()
        return CALMAutoencoderOutput(loss=loss, logits=logits, accuracy=accuracy, mean=mean, log_std=log_std)


class CALMForCausalLM(CALMPreTrainedModel, CALMGenerationMixin):
    """CALM language model: Llama backbone over chunks, energy head, frozen autoencoder."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config)
        self.patch_size = config.patch_size
        d = config.hidden_size
        self.transformer = LlamaModel(config)
        self.embed_proj = nn.Sequential(
            nn.Linear(config.patch_size * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=1e-6)
        )
        self.generative_head = MLPGenerator(config)
        self.ae_model = CALMAutoencoder(config.autoencoder_config)
        self.ae_model.requires_grad_(False)
        self.post_init()
        if self.generation_config is not None:  # replaced by generation_config.json when loading a saved model
            for key, value in CALM_GENERATION_DEFAULTS.items():
                setattr(self.generation_config, key, value)
            self.generation_config._from_model_config = False  # our own defaults, not derived from config.json

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
        return self.embed_proj(embeds.reshape(batch_size, seq_len // self.patch_size, -1))

    def backbone(
        self,
        chunk_embeds: torch.Tensor,
        chunk_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        cache_position: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, object, object]:
        """Run the Llama backbone on chunk vectors [B, P, d]; chunk_mask covers past + current chunks (for a
        `StaticCache`: may cover all its slots, future ones as ones). `cache_position` [P]: the cache slots of these
        chunks, for transformers 4.57's static caches (without it they count their filled slots, a read of the cache).

        Returns (last_hidden_state [B, P, d], cache, raw backbone output).
        """
        if cache_position is not None and TAKES_CACHE_POSITION:
            kwargs["cache_position"] = cache_position
        outputs = self.transformer(
            inputs_embeds=chunk_embeds,
            attention_mask=chunk_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KWARG: past_key_values},
            **kwargs,
        )
        cache = getattr(outputs, CACHE_KWARG, None)
        return outputs.last_hidden_state, cache, outputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: object | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        head_noise: torch.Tensor | None = None,
        target_noise: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CALMOutput:
        """Backbone states per chunk; with `labels`, the energy loss (and Brier-1..4 in eval mode).

        input_ids, attention_mask, labels: [B, P*K] (token level; a chunk is attended if any of its tokens is).
        With labels, the inputs are chunks 0..P-2 and the targets chunks 1..P-1; a target chunk with any label
        of -100 is skipped. `head_noise` [num_samples, n_targets, noise_size] (uniform in [-0.5, 0.5)) and
        `target_noise` [num_target_samples, n_targets, latent_size] (standard normal) replace the random draws.
        """
        past_key_values = kwargs.pop("cache", past_key_values)
        if input_ids is None:
            raise ValueError("CALMForCausalLM.forward needs input_ids (the model embeds whole chunks of tokens).")
        check_input_ids(input_ids, self.config.vocab_size, self.patch_size)
        batch_size, seq_len = input_ids.shape
        num_chunks = seq_len // self.patch_size
        if attention_mask is not None and attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, input_ids {batch_size}.")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else False
        extra = {"output_hidden_states": output_hidden_states, "output_attentions": bool(output_attentions)}

        if labels is None:
            token_mask, chunk_mask = self._split_mask(attention_mask, seq_len)
            if chunk_mask is not None and position_ids is None and past_key_values is None:
                position_ids = (chunk_mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden, cache, outputs = self.backbone(
                self.embed_chunks(input_ids, token_mask),
                chunk_mask,
                position_ids,
                past_key_values,
                use_cache=bool(use_cache if use_cache is not None else self.config.use_cache),
                **extra,
            )
            return CALMOutput(
                last_hidden_state=hidden,
                **{CACHE_KWARG: cache},
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )

        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
            )
        if num_chunks < 2:
            raise ValueError(f"training needs at least 2 chunks ({2 * self.patch_size} tokens) per row, got {seq_len}.")

        # Inputs: chunks 0..P-2; targets: chunks 1..P-1.
        token_mask, chunk_mask = self._split_mask(attention_mask, seq_len)
        input_len = (num_chunks - 1) * self.patch_size
        chunk_mask = chunk_mask[:, :-1] if chunk_mask is not None else None
        hidden, _, outputs = self.backbone(
            self.embed_chunks(input_ids[:, :input_len], token_mask[:, :input_len] if token_mask is not None else None),
            chunk_mask,
            (chunk_mask.long().cumsum(-1) - 1).clamp(min=0) if chunk_mask is not None else None,
            **extra,
        )  # [B, P-1, d]
        target_ids = labels[:, self.patch_size :].reshape(batch_size, num_chunks - 1, self.patch_size)
        target_valid = (target_ids != -100).all(-1)  # [B, P-1]
        hidden = hidden[target_valid]  # [n, d], row-major over (batch, chunk)
        target_ids = target_ids[target_valid]  # [n, K]
        with torch.no_grad():
            mean, log_std = self.ae_model.encoder(target_ids.reshape(1, -1))  # [1, n, l]
        mean, log_std = mean[0], log_std[0]

        samples = self.generative_head.sample(
            hidden.unsqueeze(0).expand(self.config.num_samples, -1, -1), head_noise
        )  # [N, n, l]
        score = energy_score(
            samples, mean, log_std, self.config.num_target_samples, self.config.beta, target_noise
        )  # [n]
        loss = -score.mean()

        brier = None
        if not self.training:
            with torch.no_grad():
                brier = self._brier(samples[:2], labels, target_valid, input_ids, token_mask, chunk_mask)
        return CALMOutput(
            loss=loss,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            brier_scores=brier,
        )

    def _split_mask(
        self, attention_mask: torch.Tensor | None, seq_len: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token mask [B, T] -> (token mask of the current input, chunk mask over past + current chunks)."""
        if attention_mask is None:
            return None, None
        if attention_mask.dim() != 2 or attention_mask.shape[1] % self.patch_size != 0:
            raise ValueError(
                f"attention_mask must be a token-level [batch_size, length] mask with length a multiple of "
                f"patch_size={self.patch_size}, got {tuple(attention_mask.shape)}."
            )
        chunk_mask = attention_mask.reshape(attention_mask.shape[0], -1, self.patch_size).any(-1).long()
        return attention_mask[:, -seq_len:], chunk_mask

    def _brier(
        self,
        first_samples: torch.Tensor,
        labels: torch.Tensor,
        target_valid: torch.Tensor,
        input_ids: torch.Tensor,
        token_mask: torch.Tensor | None,
        chunk_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Brier-1..4 at each target chunk start, from two samples per position.

        K >= 4: the first 4 tokens of each decoded sample. K < 4: each sample is rolled out for ceil(4/K) chunks,
        feeding the sampled tokens back (one extra backbone pass per roll-out chunk).
        """
        k = self.patch_size
        batch_size, seq_len = labels.shape
        num_positions = seq_len // k - 1
        tokens = self.ae_model.decode_tokens(first_samples.unsqueeze(-2))  # [2, n, K]
        # The target n-grams: the (up to 4) label tokens after each chunk start; missing ones are invalid.
        span = max(BRIER_MAX_N, k)
        padded = F.pad(labels[:, k:], (0, span), value=-100)
        windows = padded.unfold(1, span, k)[:, :num_positions]  # [B, P-1, span]
        windows = windows[target_valid]  # [n, span]
        if k >= BRIER_MAX_N:
            return brier_scores(tokens[0], tokens[1], windows, windows != -100)

        rollout = self._rollout(first_samples, input_ids, token_mask, chunk_mask, target_valid)  # [2, n, R*K]
        return brier_scores(
            rollout[0], rollout[1], windows[:, : rollout.shape[-1]], windows[:, : rollout.shape[-1]] != -100
        )

    def _rollout(
        self,
        first_samples: torch.Tensor,
        input_ids: torch.Tensor,
        token_mask: torch.Tensor | None,
        chunk_mask: torch.Tensor | None,
        target_valid: torch.Tensor,
    ) -> torch.Tensor:
        """For K < 4: continue each of the 2 samples at each position for ceil(4/K) chunks in all.

        Every (sample, position) becomes its own row: the row for position t sees input chunks 0..t (later chunks
        masked out) followed by its own sampled chunks. Returns token ids [2, n, ceil(4/K) * K].
        """
        k = self.patch_size
        num_steps = -(-BRIER_MAX_N // k)
        batch_size = input_ids.shape[0]
        num_inputs = input_ids.shape[1] // k - 1
        rows_b, rows_t = target_valid.nonzero(as_tuple=True)  # n rows, in the order of the samples
        embeds = self.embed_chunks(
            input_ids[:, : num_inputs * k], token_mask[:, : num_inputs * k] if token_mask is not None else None
        )  # [B, P-1, d]
        base_mask = chunk_mask if chunk_mask is not None else embeds.new_ones(batch_size, num_inputs, dtype=torch.long)
        positions = (base_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P-1]
        rows_mask = base_mask[rows_b] * (torch.arange(num_inputs, device=embeds.device) <= rows_t[:, None])
        rows_mask = rows_mask.repeat(2, 1)  # [2n, P-1]: both samples
        _, cache, _ = self.backbone(
            embeds[rows_b].repeat(2, 1, 1), rows_mask, positions[rows_b].repeat(2, 1), use_cache=True
        )
        next_position = positions[rows_b, rows_t].repeat(2) + 1  # [2n]

        latents = first_samples.reshape(-1, first_samples.shape[-1])  # [2n, l]
        chunks = [self.ae_model.decode_tokens(latents.unsqueeze(1))]  # each [2n, K]
        for step in range(1, num_steps):
            rows_mask = torch.cat([rows_mask, rows_mask.new_ones(rows_mask.shape[0], 1)], dim=1)
            hidden, cache, _ = self.backbone(
                self.embed_chunks(chunks[-1]), rows_mask, (next_position + step - 1)[:, None], cache, use_cache=True
            )
            chunks.append(self.ae_model.decode_tokens(self.generative_head.sample(hidden[:, -1]).unsqueeze(1)))
        return torch.cat(chunks, dim=-1).reshape(2, -1, num_steps * k)


# `save_pretrained` copies this code next to the weights and writes `auto_map`, so that saved folders load with
# `trust_remote_code=True` and no install.
CALMConfig.register_for_auto_class()
CALMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CALMAutoencoderConfig.register_for_auto_class()
CALMAutoencoder.register_for_auto_class("AutoModel")
