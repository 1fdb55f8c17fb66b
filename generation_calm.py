"""Generation for CALM: K tokens per step, through transformers' `generate` interface (spec section 4).

Per step: the backbone reads the last chunk (one position, KV cache), the energy head draws latent vectors,
the autoencoder decodes them to K tokens, and `temperature_sampling` picks one chunk per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, StaticCache
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

# CALM's own generation settings, written to generation_config.json (the authors' defaults: T = 0.5, N = 200).
CALM_GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.5,
    "num_samples": 200,
    "prompt_alignment": "left",
    "shortlist_size": 64,
    "temperature_sampler": "pool",
}
_CALM_ONLY = ("num_samples", "prompt_alignment", "shortlist_size", "temperature_sampler")  # not transformers' own
PROMPT_ALIGNMENTS = ("left", "reference")
# None is transformers' default (a DynamicCache); "static" preallocates the whole generation, so that every step
# has the same shapes (a compiled backbone then compiles once).
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
TEMPERATURE_SAMPLERS = ("pool", "exact")
# Chunks the exact sampler may draw for one position before it gives up (its cost has no bound).
EXACT_SAMPLER_MAX_DRAWS = 20_000
# Settings of transformers' generate that would change what is returned but that CALM's sampler cannot honour.
_UNSUPPORTED = ("num_beams", "num_return_sequences")
# Settings that act on token logits, which CALM does not have: ignored, with a warning unless they are at a value
# that does nothing (or transformers' default, which `generate` fills in: top_k = 50). A model's saved
# generation_config.json may hold such values (one converted from a token model), so they do not raise.
_TOKEN_LOGIT_SETTINGS = {
    "top_k": (0, 50),
    "top_p": (1.0,),
    "min_p": (0.0,),
    "top_h": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "bad_words_ids": (),
    "sequence_bias": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "renormalize_logits": (False,),
    "guidance_scale": (1.0,),
    "watermarking_config": (),
    "output_scores": (False,),
    "output_logits": (False,),
}
_IGNORED_MODEL_KWARGS = ("use_cache", "output_attentions", "output_hidden_states", "return_dict", "token_type_ids")

NoiseSampler = Callable[[tuple, torch.device, torch.dtype], torch.Tensor]


def _inverse_temperature(temperature: float) -> float:
    """1/T for T in (0, 1], snapped to the integer n when T is 1/n up to rounding (T = 1/3 is 3, not 2.9999...)."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1] for CALM, got {temperature}.")
    r = 1.0 / temperature
    return float(round(r)) if abs(r - round(r)) < 1e-6 else r


def temperature_sampling(
    candidates: torch.Tensor,
    temperature: float,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one chunk per row from a pool of sampled chunks so that chunk x is drawn with probability ~ P(x)^(1/T).

    candidates: [B, N, K] token ids, N independent draws from the model per row. Returns indices [B] into N.
    See `sample_from_pool` for the rule.
    """
    same = (candidates.unsqueeze(2) == candidates.unsqueeze(1)).all(-1)  # [B, N, N]
    return sample_from_pool(same, temperature, do_sample, generator=generator)


def sample_from_pool(
    same: torch.Tensor,
    temperature: float,
    do_sample: bool = True,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Temperature sampling from a pool given which candidates are the same chunk. Returns indices [B] into N.

    same: [B, N, N] bool, same[b, i, j] when candidates i and j of row b decode to the same chunk.
    With r = 1/T and c(x) the number of copies of x in the pool, unique chunks are weighted by the (generalised)
    binomial coefficient C(c, r') for the largest r' = r - j (j = 0, 1, ...) that some chunk reaches (c >= r').
    For T = 1/n this is exactly the authors' batch algorithm (m = n, n-1, ..., 1; E[C(c, n)] is proportional to
    p^n); for other T, C(c, r) ~ (N p)^r / r! keeps it consistent as N grows. `do_sample=False` returns the most
    frequent chunk (ties: the first seen).
    The draw inverts the weights' cumulative sum at `uniform` [B] in [0, 1) (drawn from `generator` when None):
    a caller that draws it first knows which candidate a given `same` would pick before decoding the pool.
    """
    r = _inverse_temperature(temperature)
    counts = same.sum(-1)  # [B, N]: copies of each candidate's chunk in the pool
    if not do_sample:
        return counts.argmax(-1)  # argmax returns the first maximum: the first-seen of the most frequent chunks
    batch_size, num_candidates = counts.shape
    arange = torch.arange(num_candidates, device=same.device)
    first_seen = same.to(torch.uint8).argmax(-1) == arange  # [B, N]: one representative per unique chunk

    counts64 = counts.to(torch.float64)
    # Largest exponent r - j (j >= 0 integer) that at least one chunk's count reaches.
    max_count = counts64.max(-1, keepdim=True).values  # [B, 1]
    exponent = r - torch.clamp(torch.ceil(r - max_count - 1e-9), min=0)  # [B, 1]
    log_weight = torch.lgamma(counts64 + 1) - torch.lgamma(counts64 - exponent + 1) - torch.lgamma(exponent + 1)
    eligible = first_seen & (counts64 >= exponent - 1e-9)
    probs = torch.softmax(log_weight.masked_fill(~eligible, float("-inf")), dim=-1)  # [B, N] float64
    if uniform is None:
        uniform = torch.rand(batch_size, generator=generator, device=same.device, dtype=torch.float64)
    cumulative = probs.cumsum(-1)  # [B, N]
    choice = torch.searchsorted(cumulative, (uniform.to(cumulative) * cumulative[:, -1]).unsqueeze(-1), right=True)
    last_eligible = torch.where(eligible, arange, -1).amax(-1, keepdim=True)  # where rounding runs past the end
    return torch.minimum(choice, last_eligible).squeeze(-1)


def exact_temperature_sampling(
    draw: Callable[[int], torch.Tensor],
    temperature: float,
    generator: torch.Generator | None = None,
    draws_per_call: int = 64,
    max_draws: int = EXACT_SAMPLER_MAX_DRAWS,
) -> torch.Tensor:
    """The paper's Algorithm 1 for one row: a chunk x with probability exactly P(x)^(1/T) / Z, for any T in (0, 1].

    draw(m) -> [m, K], m independent chunks of the model (called for `draws_per_call` at a time; unused draws are
    dropped, which leaves the rest independent). With 1/T = n + alpha, n = floor(1/T): stage 1 draws n chunks
    until all n are the same chunk x* (probability ~ P(x*)^n); for alpha = 0 that is the result. Stage 2, a
    Bernoulli factory that accepts x* with probability P(x*)^alpha: i = 1; draw x; if x = x*, accept; otherwise with
    probability alpha / i start again at stage 1, else i = i + 1 and draw again. Unbiased for any T, but a stage-1
    attempt succeeds with probability sum_x P(x)^n: flat distributions and small T need many draws. More than
    `max_draws` raise a RuntimeError. Returns the chunk [K].
    """
    r = _inverse_temperature(temperature)
    n = int(r)
    alpha = r - n
    pending: list[tuple[int, ...]] = []  # drawn chunks not used yet, the next one last
    drawn, device = 0, None

    def next_chunk() -> tuple[int, ...]:
        nonlocal drawn, device
        if not pending:
            if drawn >= max_draws:
                raise RuntimeError(
                    f"exact temperature sampling drew {drawn} chunks for one position without accepting one "
                    f"(T = {temperature:g}: an attempt succeeds with probability sum_x P(x)^{n}, tiny for a flat "
                    "distribution). Use temperature_sampler='pool' (the batch algorithm), or a larger temperature."
                )
            chunks = draw(draws_per_call)  # [m, K]
            device = chunks.device
            pending.extend(map(tuple, reversed(chunks.tolist())))
            drawn += len(chunks)
        return pending.pop()

    def factory_accepts(x_star: tuple[int, ...]) -> bool:
        """Stage 2: True with probability P(x*)^alpha."""
        i = 1
        while next_chunk() != x_star:
            if float(torch.rand((), generator=generator, device=device, dtype=torch.float64)) < alpha / i:
                return False
            i += 1
        return True

    while True:
        x_star = next_chunk()
        # Stage 1 fails at the first of the other n - 1 draws that differs (`all` stops there).
        if all(next_chunk() == x_star for _ in range(n - 1)) and (alpha == 0.0 or factory_accepts(x_star)):
            return torch.tensor(x_star, device=device)


ArgmaxRows = Callable[..., torch.Tensor]  # (states [B, M, a], active [B, M], optional=None) -> tokens [B, M]
TokenStates = Callable[[torch.Tensor, slice], torch.Tensor]


def identical_chunks(
    chunk_states: torch.Tensor,
    token_states: TokenStates,
    patch_size: int,
    argmax_rows: ArgmaxRows,
    complete: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates decode to the same chunk, decoding as few of their tokens as possible.

    chunk_states: [B, N, c] one state per candidate chunk, and token_states(chunk_states [n, c], positions: slice)
    -> [n, len, a] the decoder states of some of its K tokens (`CALMDecoder.chunk_state` / `token_states`);
    argmax_rows(states [B, M, a], active [B, M]) -> token ids [B, M] of the active states (-1 elsewhere), e.g.
    `plain_argmax` or `certified_argmax`. Returns same [B, N, N] bool, exactly `(tokens_i == tokens_j).all()` of the
    decoded chunks, and the tokens decoded on the way, [B, N, K], -1 after the prefix that made a candidate unique.
    `complete` [B] names one candidate per row (the likely choice) whose later tokens are decoded too where the
    first tokens' pass projects onto the whole vocabulary anyway (argmax_rows(..., optional=[B, M] bool)).

    Token by token: a candidate whose prefix is already unique in its row is a chunk of its own (count 1)
    whatever its later tokens are, so only candidates that share their prefix with another need the next token.
    With diverse candidates most of the pool is settled after the first token. (The vocabulary projection,
    V x a per token, is ~95% of a candidate decode.) The decoder states of the later tokens are computed in one
    call for the candidates still in question after the first token: fewer, larger matmuls. The later tokens of
    `complete` ride along with the first tokens, in the same pass over the vocabulary (a decode of its own would
    read the whole V x a weight again).
    """
    batch_size, num_candidates, _ = chunk_states.shape
    same = torch.ones(batch_size, num_candidates, num_candidates, dtype=torch.bool, device=chunk_states.device)
    tokens = torch.full((batch_size, num_candidates, patch_size), -1, dtype=torch.long, device=chunk_states.device)
    rows = torch.arange(batch_size, device=chunk_states.device)
    for position in range(patch_size):
        shared = same.sum(-1) >= 2  # [B, N]: prefix seen elsewhere in the row
        if position > 0 and not bool(shared.any()):
            break
        if position < 2:  # the first token of every candidate, then all later tokens of those still in question
            offset = position  # states[:, :, i] is the state of token offset + i
            decoded = token_states(chunk_states[shared], slice(offset, 1 if offset == 0 else patch_size))  # [n, len, a]
            states = decoded.new_zeros(batch_size, num_candidates, *decoded.shape[1:])
            states[shared] = decoded
        if position == 0 and complete is not None:  # and the later tokens of `complete`: [B, N + K - 1, ...]
            later = token_states(chunk_states[rows, complete], slice(1, patch_size))  # [B, K - 1, a]
            extra = shared.new_ones(batch_size, patch_size - 1)
            found = argmax_rows(
                torch.cat([states[:, :, 0], later], dim=1),
                torch.cat([shared, ~extra], dim=1),
                optional=torch.cat([~shared, extra], dim=1),
            )
            tokens[:, :, 0], later_tokens = found.split([num_candidates, patch_size - 1], dim=1)  # -1: not decoded
        else:
            tokens[:, :, position] = argmax_rows(states[:, :, position - offset], shared)  # [B, N], -1 where settled
        same &= tokens[:, :, position].unsqueeze(2) == tokens[:, :, position].unsqueeze(1)  # -1 only keeps itself
    if complete is not None:
        chunk = tokens[rows, complete]  # [B, K]; its later tokens are -1 where it was unique after its first
        tokens[rows, complete] = torch.cat([chunk[:, :1], torch.where(chunk[:, 1:] < 0, later_tokens, chunk[:, 1:])], 1)
    return same, tokens


def complete_chunks(
    tokens: torch.Tensor,
    chunk_states: torch.Tensor,
    token_states: TokenStates,
    argmax_tokens: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Decode the tokens a pool left undecoded (-1): tokens [B, K], chunk_states [B, c] -> tokens [B, K].

    The missing tokens of a chunk are a suffix; all of them go through one `argmax_tokens` call (each call reads
    the whole V x a projection).
    """
    missing = tokens < 0  # [B, K]: the tokens after the prefix that made the chunk unique in its pool
    rows = missing.any(-1)
    if not bool(rows.any()):
        return tokens
    first = int(missing.to(torch.uint8).argmax(-1)[rows].min())
    states = token_states(chunk_states[rows], slice(first, tokens.shape[1]))  # [n, K - first, a]
    tokens = tokens.clone()
    todo = missing[rows, first:]  # [n, K - first]
    decoded = tokens[rows]
    decoded[:, first:][todo] = argmax_tokens(states[todo])
    tokens[rows] = decoded
    return tokens


def plain_argmax(
    states: torch.Tensor,
    active: torch.Tensor,
    argmax_tokens: Callable[[torch.Tensor], torch.Tensor],
    optional: torch.Tensor | None = None,
) -> torch.Tensor:
    """states [B, N, a], active [B, N] -> argmax token ids [B, N] of the active states, -1 elsewhere.

    `optional` [B, N]: states to decode too if the call projects onto the whole vocabulary anyway (here: always).
    """
    if optional is not None:
        active = active | optional
    tokens = torch.full(active.shape, -1, dtype=torch.long, device=states.device)
    tokens[active] = argmax_tokens(states[active])
    return tokens


def certified_argmax(
    states: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor,
    max_row_norm: float,
    argmax_tokens: Callable[[torch.Tensor], torch.Tensor],
    shortlist_size: int = 64,
    optional: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tokens of `plain_argmax`, projecting most candidates onto a shortlist of the vocabulary only.

    states [B, N, a], active [B, N]; weight [V, a] the output projection, max_row_norm its largest row norm.
    Per row, the first active state (the probe p) is projected in full; its top `shortlist_size` tokens are the
    shortlist S, and tau is its best score outside S. For a candidate h = p + delta and a token v outside S,
    w_v.h = w_v.p + w_v.delta <= tau + |w_v| |delta| (Cauchy-Schwarz). When the best shortlisted token beats that
    bound and the runner-up by more than rounding can blur, it is the argmax (certified); the others are
    projected in full by `argmax_tokens`. Pays off when candidates agree (trained models at T < 1); diverse
    candidates (random weights) fail the certificate and cost one probe projection per row more.
    `optional` [B, N]: states decoded (in the same call) only where some active state is projected in full.
    """
    batch_size, num_candidates, hidden_size = states.shape
    tokens = torch.full((batch_size, num_candidates), -1, dtype=torch.long, device=states.device)
    rows = active.any(-1).nonzero().squeeze(-1)  # [R]
    if rows.numel() == 0:
        return tokens
    states, active = states[rows].float(), active[rows]  # fp32: the certificate's own arithmetic is exact enough
    probe = states[torch.arange(rows.numel()), active.to(torch.uint8).argmax(-1)]  # [R, a]
    from .modeling_calm import vocab_logits  # modeling_calm imports this module

    probe_logits = vocab_logits(weight, probe.to(weight.dtype)).T.float()  # [R, V]; weight as the streamed operand
    size = min(shortlist_size, weight.shape[0])
    top = probe_logits.topk(min(size + 1, weight.shape[0]), dim=-1)
    shortlist = top.indices[:, :size].sort(-1).values  # [R, s], by token id: ties go to the lower id
    tau = top.values[:, size] if size < weight.shape[0] else None  # [R]
    scores = torch.einsum("rna,rsa->rns", states, weight[shortlist].float())  # [R, N, s]
    best, second = scores.topk(2, dim=-1).values.unbind(-1)  # [R, N]
    winner = shortlist.gather(1, scores.argmax(-1))  # [R, N]

    # Rounding: the plain path rounds each logit to the weight's dtype after accumulating a products in fp32.
    eps = torch.finfo(weight.dtype).eps
    accumulation = hidden_size * torch.finfo(torch.float32).eps * max_row_norm
    rival = second
    if tau is not None:  # a shortlist of the whole vocabulary has nothing outside it
        outside = tau + eps * tau.abs() + accumulation * probe.norm(dim=-1)  # [R]: bound on w_v.p, v outside S
        outside = outside[:, None] + max_row_norm * (states - probe[:, None]).norm(dim=-1)  # [R, N]
        rival = torch.maximum(second, outside)
    margin = 2 * eps * (best.abs() + rival.abs()) + 2 * accumulation * states.norm(dim=-1)
    certified = active & (best - rival > margin)

    row_tokens = torch.full(active.shape, -1, dtype=torch.long, device=tokens.device)
    row_tokens[certified] = winner[certified]
    unsure = active & ~certified
    if bool(unsure.any()):
        if optional is not None:
            unsure |= optional[rows]
        row_tokens[unsure] = argmax_tokens(states[unsure].to(weight.dtype))
    tokens[rows] = row_tokens
    return tokens


class ShortlistArgmax:
    """`argmax_rows` for `identical_chunks`: `certified_argmax` while it pays off, `plain_argmax` otherwise.

    Whether candidates agree depends on the model and the context. After a call that certified fewer than a
    quarter of its candidates, the next `backoff` calls project in full, twice as many after each further such call
    in a row (up to 32 x backoff: diverse pools, e.g. random weights, then pay for a probe every few hundred calls);
    a call that certifies more resets it. The tokens are the same either way.
    A call with at most `min_states` active states (it counts towards the `backoff` calls) projects them in full:
    the certificate needs one full projection (the probe's), and a projection of a few states costs about that of
    one (the read of the V x a weight dominates: CALM-M in bf16 on this project's CPU, weight read from memory,
    6.9 ms for 1 state, 7.0 to 8.7 ms for 2 to 16, in a timing script).
    `certified` and `requested` count candidates over the object's life (for benchmarks).
    """

    def __init__(
        self, autoencoder: torch.nn.Module, shortlist_size: int = 64, backoff: int = 8, min_states: int = 16
    ) -> None:
        self.autoencoder = autoencoder
        self.weight = autoencoder.encoder.embed_tokens.weight  # [V, a]
        self.argmax_tokens = autoencoder.argmax_tokens
        self.shortlist_size, self.backoff, self.min_states = shortlist_size, backoff, min_states
        self.skip = self.failures = self.certified = self.requested = self.uncertified = 0

    def _counting_argmax(self, states: torch.Tensor) -> torch.Tensor:
        self.uncertified += states.shape[0]
        return self.argmax_tokens(states)

    def __call__(
        self, states: torch.Tensor, active: torch.Tensor, optional: torch.Tensor | None = None
    ) -> torch.Tensor:
        requested = 0 if self.skip else int(active.sum())  # not counted while backing off
        if self.skip or requested <= self.min_states:
            self.skip = max(self.skip - 1, 0)
            return plain_argmax(states, active, self.argmax_tokens, optional)
        self.uncertified = 0
        max_row_norm = self.autoencoder.max_row_norm()
        tokens = certified_argmax(
            states, active, self.weight, max_row_norm, self._counting_argmax, self.shortlist_size, optional
        )
        if optional is not None:  # decoded along with the uncertified ones, not asked for
            self.uncertified -= int((tokens[optional & ~active] >= 0).sum())
        self.requested += requested
        self.certified += requested - self.uncertified
        if requested - self.uncertified < requested / 4:
            self.failures += 1
            self.skip = self.backoff * 2 ** min(self.failures - 1, 5)
        else:
            self.failures = 0
        return tokens


def _check_devices(
    device: torch.device,
    model_device: torch.device,
    attention_mask: torch.Tensor | None,
    generator: torch.Generator | None,
) -> None:
    """Raise a clear error where the prompt, its mask or the generator is not on the model's device (the backbone's
    own error would name a kernel, not the argument to move). Weights offloaded by accelerate are on "meta": not
    checked."""
    if model_device.type != "meta" and device != model_device:
        raise ValueError(
            f"input_ids are on {device} but the model is on {model_device}: pass input_ids.to(model.device) (and "
            "the attention_mask too)."
        )
    if attention_mask is not None and attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {device}: move it to {device}.")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is a {generator.device.type} generator but the model generates on {device}: pass "
            f"torch.Generator(device=model.device).manual_seed(...)."
        )


def align_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_size: int, pad_token_id: int, alignment: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay prompts out in whole chunks. Returns (ids [B, P*K], token mask [B, P*K]).

    "left": each row's real tokens (left- or right-padded on input) are moved to the end and the front is padded,
    so every prompt ends on a chunk boundary and the first generated chunk directly continues it; padding is
    masked (embedded as zeros, and fully padded chunks are not attended). "reference": the authors' layout,
    the prompt right-padded with [PAD] tokens that the model conditions on (prompts must have equal lengths).
    """
    batch_size, length = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    if alignment == "reference":
        if not bool((lengths == length).all()):
            raise ValueError(
                "prompt_alignment='reference' reproduces the authors' unbatched loop and needs unpadded prompts of "
                "equal length; use prompt_alignment='left' for padded batches."
            )
        pad = -length % patch_size
        ids = F.pad(input_ids, (0, pad), value=pad_token_id)
        return ids, torch.ones_like(ids)
    if alignment != "left":
        raise ValueError(f"prompt_alignment must be one of {PROMPT_ALIGNMENTS}, got {alignment!r}.")
    # Stable sort puts padding first and keeps the real tokens in order: the prompt becomes left-padded.
    order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices
    ids = torch.gather(input_ids, 1, order).masked_fill(~torch.gather(mask, 1, order), pad_token_id)
    total = max(patch_size, -(-int(lengths.max()) // patch_size) * patch_size)
    ids = ids[:, max(0, length - total) :]
    ids = F.pad(ids, (total - ids.shape[1], 0), value=pad_token_id)
    positions = torch.arange(total, device=ids.device)
    token_mask = (positions >= total - lengths[:, None]).long()
    return ids, token_mask


class CALMGenerationMixin(GenerationMixin):
    """`generate` for CALM: one backbone step per chunk of K tokens, no Python loop over rows or candidates."""

    def _calm_generation_config(self, generation_config: GenerationConfig | None, kwargs: dict):
        calm_settings = {key: kwargs.pop(key) for key in _CALM_ONLY if key in kwargs}
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        for key in _CALM_ONLY:
            saved = getattr(generation_config, key, None)
            calm_settings.setdefault(key, CALM_GENERATION_DEFAULTS[key] if saved is None else saved)
        for key, value in calm_settings.items():
            setattr(generation_config, key, value)
        for key in _UNSUPPORTED:
            if (getattr(generation_config, key, None) or 1) != 1:
                raise ValueError(f"CALM generation does not support {key}={getattr(generation_config, key)!r}; use 1.")
        ignored = {
            key: value
            for key, inert in _TOKEN_LOGIT_SETTINGS.items()
            if (value := getattr(generation_config, key, None)) not in (None, [], {}, *inert)
        }
        if ignored:
            settings = ", ".join(f"{key}={value!r}" for key, value in ignored.items())
            warnings.warn(
                f"CALM generation ignores {settings}: these act on or return token logits, which CALM does not have "
                "(it draws whole chunks of K tokens from its energy head). To shape the sampling, use temperature in "
                "(0, 1] and num_samples.",
                UserWarning,
                stacklevel=4,  # the caller of generate (through torch.no_grad's wrapper)
            )
        temperature = 1.0 if generation_config.temperature is None else float(generation_config.temperature)
        if not 0.0 < temperature <= 1.0:
            raise ValueError(
                f"temperature must be in (0, 1] for CALM (got {temperature}): values below 1 sharpen the chunk "
                "distribution; CALM has no way to flatten it. Use e.g. temperature=0.5."
            )
        if not isinstance(generation_config.num_samples, int) or generation_config.num_samples < 1:
            raise ValueError(
                "num_samples (the candidate pool per step) must be a positive integer, "
                f"got {generation_config.num_samples!r}."
            )
        if generation_config.temperature_sampler not in TEMPERATURE_SAMPLERS:
            raise ValueError(
                f"temperature_sampler must be 'pool' (the authors' batch algorithm over num_samples candidates) or "
                f"'exact' (the paper's Algorithm 1), got {generation_config.temperature_sampler!r}."
            )
        if generation_config.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"CALM generation supports cache_implementation None or 'dynamic' (the default, a DynamicCache) and "
                f"'static' (a StaticCache), got {generation_config.cache_implementation!r}."
            )
        shortlist_size = generation_config.shortlist_size
        if not isinstance(shortlist_size, int) or shortlist_size < 0 or shortlist_size == 1:
            raise ValueError(
                f"shortlist_size must be 0 (always project candidates onto the whole vocabulary) or an integer >= 2, "
                f"got {shortlist_size!r}."
            )
        return generation_config, model_kwargs

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: object | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn: object | None = None,
        synced_gpus: bool | None = None,
        assistant_model: object | None = None,
        streamer: object | None = None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise_sampler: NoiseSampler | None = None,
        **kwargs: object,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Generate text K tokens per step. Returns prompt + new tokens, [B, prompt_len + new_len].

        Takes the usual arguments (`input_ids`/`inputs`, `attention_mask`, `generation_config`, `max_new_tokens`,
        `max_length`, `min_new_tokens`, `eos_token_id`, `stopping_criteria`, `max_time`, `streamer`,
        `return_dict_in_generate`) and CALM's own: `temperature` in (0, 1], `num_samples` (candidate pool for
        T < 1 or do_sample=False), `prompt_alignment` ("left" or "reference"), `shortlist_size`,
        `temperature_sampler` ("pool": the authors' batch algorithm; "exact": the paper's Algorithm 1, drawing
        `num_samples` chunks per model call). `cache_implementation="static"` preallocates the KV cache for the whole
        generation (same tokens; fixed shapes for a compiled backbone, `model.transformer.compile()`). `generator`
        seeds the draws; `noise_sampler(shape, device, dtype)` replaces the head's uniform noise in [-0.5, 0.5) (for
        replaying draws).
        """
        for name, value in (
            ("logits_processor", logits_processor),
            ("prefix_allowed_tokens_fn", prefix_allowed_tokens_fn),
            ("assistant_model", assistant_model),
            ("negative_prompt_ids", negative_prompt_ids),
        ):
            if value:
                raise ValueError(f"CALM generation does not support {name}: CALM has no token logits to process.")
        input_ids = kwargs.pop("input_ids", inputs)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (or inputs): a [batch_size, length] tensor of prompt ids.")
        attention_mask = kwargs.pop("attention_mask", None)
        generation_config, model_kwargs = self._calm_generation_config(generation_config, kwargs)
        unknown = set(model_kwargs) - set(_IGNORED_MODEL_KWARGS)
        if unknown:
            raise ValueError(f"generate() got arguments CALM does not use: {sorted(unknown)}.")

        from .modeling_calm import check_input_ids  # avoid a circular import at module load

        if isinstance(input_ids, torch.Tensor):  # before check_input_ids reads the ids on their device
            _check_devices(input_ids.device, self.device, attention_mask, generator)
        check_input_ids(input_ids, self.config.vocab_size)
        batch_size, prompt_len = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("every prompt needs at least one token: a row of attention_mask is all zeros.")

        k = self.config.patch_size
        pad_token_id = generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        eos = generation_config.eos_token_id
        eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=device)
        if generation_config.max_new_tokens is not None:
            max_new_tokens = generation_config.max_new_tokens
        else:
            max_new_tokens = generation_config.max_length - prompt_len
            if max_new_tokens <= 0:
                raise ValueError(
                    f"the prompt ({prompt_len} tokens) is already max_length={generation_config.max_length} tokens "
                    "long; set max_new_tokens instead, or a larger max_length."
                )
        min_new_tokens = generation_config.min_new_tokens or 0
        temperature = 1.0 if generation_config.temperature is None else float(generation_config.temperature)
        do_sample = bool(generation_config.do_sample)
        pool_size = 1 if (do_sample and temperature == 1.0) else generation_config.num_samples
        exact = do_sample and temperature < 1.0 and generation_config.temperature_sampler == "exact"
        pool_argmax = None  # _next_chunk's default: plain_argmax
        if pool_size > 1 and generation_config.shortlist_size and not exact:
            pool_argmax = ShortlistArgmax(self.ae_model, generation_config.shortlist_size)

        ids, token_mask = align_prompts(input_ids, attention_mask, k, pad_token_id, generation_config.prompt_alignment)
        num_chunks = ids.shape[1] // k + -(-max_new_tokens // k)
        if num_chunks > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens need {num_chunks} chunks of {k} tokens, more than the model's "
                f"max_position_embeddings={self.config.max_position_embeddings} chunks; shorten the prompt or "
                "max_new_tokens."
            )

        criteria = StoppingCriteriaList(stopping_criteria or [])
        if generation_config.max_time is not None:
            criteria.append(MaxTimeCriteria(generation_config.max_time))
        if streamer is not None:
            streamer.put(input_ids.cpu())

        chunk_mask = token_mask.reshape(batch_size, -1, k).any(-1).long()  # [B, P]
        position_ids = (chunk_mask.cumsum(-1) - 1).clamp(min=0)
        if bool(chunk_mask.all()):  # no fully padded chunk: the backbone's own causal mask and positions are these
            chunk_mask = position_ids = None  # and building a mask every step costs time
        else:  # [B, all chunks]: the generated ones are real; a static cache takes it whole, others its past
            chunk_mask = F.pad(chunk_mask, (0, num_chunks - chunk_mask.shape[1]), value=1)
        static = generation_config.cache_implementation == "static"
        # The backbone reads the prompt's chunks and every new chunk but the last.
        cache = StaticCache(config=self.config, max_cache_len=num_chunks - 1) if static else None
        cached = 0  # chunks in the cache
        chunk_embeds = self.embed_chunks(ids, token_mask)
        new_tokens = input_ids.new_zeros(batch_size, 0)
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        running = batch_size  # int(unfinished.sum()): while every row runs, no padding to write
        while new_tokens.shape[1] < max_new_tokens:
            new_chunks = chunk_embeds.shape[1]
            mask = chunk_mask if chunk_mask is None or static else chunk_mask[:, : cached + new_chunks]
            slots = torch.arange(cached, cached + new_chunks, device=device) if static else None
            hidden, cache, _ = self.backbone(chunk_embeds, mask, position_ids, cache, True, cache_position=slots)
            cached += new_chunks
            if exact:
                chunk = self._exact_chunk(hidden[:, -1], temperature, pool_size, generator, noise_sampler)
            else:
                chunk = self._next_chunk(
                    hidden[:, -1], pool_size, temperature, do_sample, generator, noise_sampler, pool_argmax
                )
            chunk = chunk[:, : max_new_tokens - new_tokens.shape[1]]  # [B, <=K]

            # Rows that stopped produce padding; a row stops at its first EOS, even inside a chunk.
            if running < batch_size:
                chunk = chunk.masked_fill(~unfinished[:, None], pad_token_id)
            if eos_ids.numel():
                is_eos = torch.isin(chunk, eos_ids)
                is_eos &= (new_tokens.shape[1] + torch.arange(chunk.shape[1], device=device)) >= min_new_tokens
                after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
                chunk = chunk.masked_fill(after_eos, pad_token_id)
                unfinished &= ~is_eos.any(-1)
            new_tokens = torch.cat([new_tokens, chunk], dim=-1)
            if streamer is not None:
                streamer.put(chunk.cpu())
            if len(criteria):
                unfinished &= ~criteria(torch.cat([input_ids, new_tokens], dim=-1), None)
            running = int(unfinished.sum())
            if running == 0 or new_tokens.shape[1] >= max_new_tokens:
                break

            chunk_embeds = self.embed_chunks(chunk)
            if position_ids is not None:
                position_ids = position_ids[:, -1:] + 1

        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids, new_tokens], dim=-1)
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def _next_chunk(
        self,
        hidden: torch.Tensor,
        pool_size: int,
        temperature: float,
        do_sample: bool,
        generator: torch.Generator | None,
        noise_sampler: NoiseSampler | None,
        pool_argmax: ArgmaxRows | None = None,
    ) -> torch.Tensor:
        """hidden [B, d] -> the next chunk's token ids [B, K]. `pool_argmax` decodes the pool (default: plain)."""
        batch_size = hidden.shape[0]
        samples = (batch_size,) if pool_size == 1 else (batch_size, pool_size)
        noise = None
        if noise_sampler is not None:
            noise = noise_sampler((*samples, self.config.noise_size), hidden.device, hidden.dtype)
        if pool_size == 1:  # one draw per row (T = 1), kept 2-D: a pool of one adds views to every layer of the head
            latents = self.generative_head.sample(hidden, noise, generator)  # [B, l]
            return self.ae_model.decode_tokens(latents.unsqueeze(1))  # [B, 1, l] -> [B, K]
        latents = self.generative_head.sample(hidden, noise, generator, num_samples=pool_size)  # [B, N, l]
        decoder = self.ae_model.decoder
        pool_argmax = pool_argmax or partial(plain_argmax, argmax_tokens=self.ae_model.argmax_tokens)
        chunk_states = decoder.chunk_state(latents)  # [B, N, a]
        # The draw comes first, so the choice in the usual case (every candidate unique: diverse candidates) is
        # known before the pool is decoded, and its whole chunk is decoded in the pool's first pass: an all-unique
        # pool weighs its candidates equally, and `sample_from_pool` picks candidate floor(u N) (greedy: the first).
        # Only a hint: where rounding at a boundary picks a neighbour, `complete_chunks` decodes the rest of it.
        uniform = None
        likely = torch.zeros(batch_size, dtype=torch.long, device=latents.device)  # [B]
        if do_sample:
            uniform = torch.rand(batch_size, generator=generator, device=latents.device, dtype=torch.float64)
            likely = (uniform * pool_size).long().clamp_(max=pool_size - 1)
        same, tokens = identical_chunks(
            chunk_states, decoder.token_states, self.config.patch_size, pool_argmax, complete=likely
        )
        choice = sample_from_pool(same, temperature, do_sample, uniform)  # [B]
        rows = torch.arange(batch_size, device=latents.device)
        # The chosen chunk's tokens as counted: complete when it is the likely one or was counted more than
        # once (shared prefixes are decoded to the end); otherwise the ones after its unique prefix are decoded.
        return complete_chunks(
            tokens[rows, choice], chunk_states[rows, choice], decoder.token_states, self.ae_model.argmax_tokens
        )

    def _exact_chunk(
        self,
        hidden: torch.Tensor,
        temperature: float,
        draws_per_call: int,
        generator: torch.Generator | None,
        noise_sampler: NoiseSampler | None,
    ) -> torch.Tensor:
        """hidden [B, d] -> the next chunk's token ids [B, K] by `exact_temperature_sampling`, row by row."""

        def draws_for(row: int) -> Callable[[int], torch.Tensor]:
            def draw(m: int) -> torch.Tensor:  # m chunks of this row: [m, K]
                noise = None
                if noise_sampler is not None:
                    noise = noise_sampler((1, m, self.config.noise_size), hidden.device, hidden.dtype)
                latents = self.generative_head.sample(hidden[row : row + 1], noise, generator, num_samples=m)
                return self.ae_model.decode_tokens(latents.transpose(0, 1))  # [m, 1, l] -> [m, K]

            return draw

        rows = range(hidden.shape[0])
        return torch.stack(
            [exact_temperature_sampling(draws_for(row), temperature, generator, draws_per_call) for row in rows]
        )


__all__ = [
    "CALM_GENERATION_DEFAULTS",
    "CALMGenerationMixin",
    "align_prompts",
    "ShortlistArgmax",
    "certified_argmax",
    "complete_chunks",
    "exact_temperature_sampling",
    "identical_chunks",
    "plain_argmax",
    "sample_from_pool",
    "temperature_sampling",
]
