"""Generation for CALM, K tokens per step, through transformers' `generate` interface (paper section 5).

Per step: the backbone reads the last chunk (one position, with the KV cache), the energy head draws latent
vectors, the autoencoder decodes them to chunks of K tokens, and temperature sampling picks one chunk per row.
At T = 1 one draw per row is the sample. At T < 1 a pool of `num_candidates` draws is decoded and a chunk is picked
with probability ~ P(chunk)^(1/T), estimated from how often it occurs in the pool (the authors' batch algorithm);
`temperature_sampler="exact"` uses the paper's exact rejection sampler (Algorithm 1) instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, StaticCache
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .utils_calm import check_input_ids, chunk_mask_of, positions_of

# CALM's own generation settings and their defaults (the authors' generate: T = 0.5 with a pool of 200).
CALM_GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.5,
    "num_candidates": 200,
    "prompt_alignment": "left",
    "temperature_sampler": "pool",
}
CALM_SETTINGS = ("num_candidates", "prompt_alignment", "temperature_sampler")  # not transformers' own
PROMPT_ALIGNMENTS = ("left", "reference")
TEMPERATURE_SAMPLERS = ("pool", "exact")
# None is transformers' default (a DynamicCache); "static" preallocates the whole generation, so that every step
# has the same shapes (a compiled backbone then compiles once).
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
# Chunks the exact sampler may draw for one position before it gives up (its cost has no bound).
EXACT_SAMPLER_MAX_DRAWS = 20_000
# Arguments of transformers' generate that CALM cannot honour: an error when set (to anything but 1 for these).
UNSUPPORTED_COUNTS = ("num_beams", "num_return_sequences")
UNSUPPORTED_ARGUMENTS = (
    "logits_processor",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
)
# Settings that act on token logits, which CALM does not have: ignored, with a warning unless they are at a value
# that does nothing (or transformers' default, which `generate` fills in: top_k = 50). A saved
# generation_config.json may hold such values (one converted from a token model), so they do not raise.
TOKEN_LOGIT_SETTINGS = {
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
IGNORED_MODEL_KWARGS = (
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "token_type_ids",
    "position_ids",  # CALM numbers chunks, not tokens: the loop derives chunk positions from the mask
)

NoiseSampler = Callable[[tuple, torch.device, torch.dtype], torch.Tensor]


def set_calm_generation_defaults(generation_config: GenerationConfig | None) -> None:
    """Give a model's generation config CALM's defaults (replaced by generation_config.json when a folder has one)."""
    if generation_config is None:
        return
    for key, value in CALM_GENERATION_DEFAULTS.items():
        setattr(generation_config, key, value)
    generation_config._from_model_config = False  # our own defaults, not derived from config.json


# ---------------------------------------------------------------------------------------------------------------
# Temperature sampling (paper section 5)


def inverse_temperature(temperature: float) -> float:
    """1/T for T in (0, 1], snapped to the integer n when T is 1/n up to rounding (T = 1/3 is 3, not 2.9999...)."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(
            f"temperature must be in (0, 1] for CALM (got {temperature}): values below 1 sharpen the chunk "
            "distribution; CALM has no way to flatten it. Use e.g. temperature=0.5."
        )
    r = 1.0 / temperature
    return float(round(r)) if abs(r - round(r)) < 1e-6 else r


def temperature_sampling(
    candidates: torch.Tensor, temperature: float, do_sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one chunk per row from a pool of sampled chunks, chunk x with probability ~ P(x)^(1/T).

    candidates: [B, N, K] token ids, N independent draws from the model per row. Returns indices [B] into N.
    See `sample_from_pool` for the rule.

    >>> pool = torch.tensor([[[1, 2], [3, 4], [1, 2]]])  # one row, three candidate chunks of K = 2
    >>> int(temperature_sampling(pool, temperature=0.5, do_sample=False))  # the most frequent, first seen
    0
    """
    same = (candidates.unsqueeze(2) == candidates.unsqueeze(1)).all(-1)  # [B, N, N]
    return sample_from_pool(same, temperature, do_sample, generator)


def sample_from_pool(
    same: torch.Tensor, temperature: float, do_sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Temperature sampling from a pool, given which candidates are the same chunk. Returns indices [B] into N.

    same: [B, N, N] bool, same[b, i, j] when candidates i and j of row b decode to the same chunk.
    With r = 1/T and c(x) the number of copies of x in the pool, unique chunks are weighted by the (generalised)
    binomial coefficient C(c, r') for the largest r' = r - j (j = 0, 1, ...) that some chunk reaches (c >= r').
    For T = 1/n this is the authors' batch algorithm (m = n, n-1, ..., 1; E[C(c, n)] is proportional to p^n); for
    other T, C(c, r) ~ (N p)^r / r! keeps it consistent as N grows. `do_sample=False` returns the most frequent
    chunk (ties: the first seen).
    """
    counts = same.sum(-1)  # [B, N]: copies of each candidate's chunk in the pool
    if not do_sample:
        return counts.argmax(-1)  # argmax returns the first maximum: the first-seen of the most frequent chunks
    r = inverse_temperature(temperature)
    num_candidates = counts.shape[1]
    first_seen = same.to(torch.uint8).argmax(-1) == torch.arange(num_candidates, device=same.device)  # [B, N]
    counts = counts.to(torch.float64)
    # The largest exponent r - j (j >= 0 integer) that at least one chunk's count reaches.
    exponent = r - torch.clamp(torch.ceil(r - counts.max(-1, keepdim=True).values - 1e-9), min=0)  # [B, 1]
    log_weight = torch.lgamma(counts + 1) - torch.lgamma(counts - exponent + 1) - torch.lgamma(exponent + 1)
    eligible = first_seen & (counts >= exponent - 1e-9)
    probs = torch.softmax(log_weight.masked_fill(~eligible, float("-inf")), dim=-1)  # [B, N]
    # One uniform per row, inverted through the cumulative weights.
    uniform = torch.rand(counts.shape[0], generator=generator, device=same.device, dtype=torch.float64)
    cumulative = probs.cumsum(-1)
    choice = torch.searchsorted(cumulative, (uniform * cumulative[:, -1]).unsqueeze(-1), right=True)
    last_eligible = torch.where(eligible, torch.arange(num_candidates, device=same.device), -1).amax(-1, keepdim=True)
    return torch.minimum(choice, last_eligible).squeeze(-1)  # where rounding runs past the end


def exact_temperature_sampling(
    draw: Callable[[int], torch.Tensor],
    temperature: float,
    generator: torch.Generator | None = None,
    draws_per_call: int = 64,
    max_draws: int = EXACT_SAMPLER_MAX_DRAWS,
) -> torch.Tensor:
    """The paper's Algorithm 1 for one row: a chunk x with probability exactly P(x)^(1/T) / Z, for any T in (0, 1].

    draw(m) -> [m, K], m independent chunks of the model (called for `draws_per_call` at a time; unused draws are
    dropped, which leaves the rest independent). With 1/T = n + alpha, n = floor(1/T): stage 1 draws n chunks until
    all n are the same chunk x*; for alpha = 0 that is the result. Stage 2, a Bernoulli factory that accepts x* with
    probability P(x*)^alpha: i = 1; draw x; if x = x*, accept; otherwise with probability alpha / i start again at
    stage 1, else i = i + 1 and draw again. A stage-1 attempt succeeds with probability sum_x P(x)^n: flat
    distributions and small T need many draws; more than `max_draws` raise a RuntimeError. Returns the chunk [K].
    """
    r = inverse_temperature(temperature)
    n, alpha = int(r), r - int(r)
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


def identical_chunks(
    token_states: torch.Tensor, argmax_tokens: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates of a pool decode to the same chunk, projecting as few token states as possible.

    token_states: [B, N, K, a], the decoder states of every candidate's K tokens; argmax_tokens(states [n, a]) ->
    token ids [n]. Returns same [B, N, N] bool, exactly `(tokens_i == tokens_j).all()` of the decoded chunks, and
    the tokens decoded on the way [B, N, K], -1 after the prefix that made a candidate unique in its row.
    Token by token: a candidate whose prefix no other candidate shares is a chunk of its own (count 1) whatever its
    later tokens are, so only shared prefixes need their next token. The vocabulary projection dominates a decode,
    and diverse pools are mostly settled after the first token.
    """
    batch_size, num_candidates, patch_size, _ = token_states.shape
    same = torch.ones(batch_size, num_candidates, num_candidates, dtype=torch.bool, device=token_states.device)
    tokens = torch.full((batch_size, num_candidates, patch_size), -1, dtype=torch.long, device=token_states.device)
    for position in range(patch_size):
        shared = same.sum(-1) >= 2 if position else torch.ones_like(same[..., 0])  # [B, N]
        if not bool(shared.any()):
            break
        column = tokens[:, :, position]
        column[shared] = argmax_tokens(token_states[:, :, position][shared])
        # Undecoded candidates (-1) are already unique: a -1 never makes two of them the same.
        same &= column.unsqueeze(2) == column.unsqueeze(1)
    return same, tokens


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def align_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_size: int, pad_token_id: int, alignment: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay prompts out in whole chunks. Returns (ids [B, P*K], token mask [B, P*K]).

    "left": each row's real tokens (left- or right-padded on input) are moved to the end and the front is padded,
    so that every prompt ends on a chunk boundary and the first generated chunk directly continues it; padding is
    masked (embedded as zeros, and fully padded chunks are not attended). "reference": the authors' layout, the
    prompt right-padded with [PAD] tokens that the model conditions on (prompts must have equal lengths).

    >>> ids, mask = align_prompts(torch.tensor([[7, 8, 9]]), torch.ones(1, 3), 2, pad_token_id=0, alignment="left")
    >>> ids.tolist(), mask.tolist()
    ([[0, 7, 8, 9]], [[0, 1, 1, 1]])
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
        ids = F.pad(input_ids, (0, -length % patch_size), value=pad_token_id)
        return ids, torch.ones_like(ids)
    # A stable sort puts the padding first and keeps the real tokens in order: the prompt becomes left-padded.
    order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices
    ids = torch.gather(input_ids, 1, order).masked_fill(~torch.gather(mask, 1, order), pad_token_id)
    total = max(patch_size, -(-int(lengths.max()) // patch_size) * patch_size)
    ids = F.pad(ids[:, max(0, length - total) :], (max(0, total - length), 0), value=pad_token_id)
    token_mask = (torch.arange(total, device=ids.device) >= total - lengths[:, None]).long()
    return ids, token_mask


# ---------------------------------------------------------------------------------------------------------------
# The generation loop


@dataclass
class GenerationRun:
    """What changes from step to step of one `generate` call."""

    sequences: torch.Tensor  # [B, prompt_len + generated so far]: the prompt as given, then the new tokens
    unfinished: torch.Tensor  # [B] bool
    chunk_embeds: torch.Tensor  # [B, chunks to read next, d]: the prompt's, then the last chunk's
    chunk_mask: torch.Tensor | None  # [B, all chunks]; None when no chunk is padding
    position_ids: torch.Tensor | None  # [B, chunks to read next]; None: the backbone counts them
    cache: object | None
    cached: int  # chunks in the cache
    static: bool  # a StaticCache: takes its slots and the mask of all of them
    max_length: int  # prompt_len + max_new_tokens
    min_length: int  # no EOS stops a row before this many tokens (prompt included), as transformers' min_length
    pad_token_id: int
    criteria: StoppingCriteriaList  # transformers' criteria but EOS: length, time, stop strings, the caller's
    eos_criteria: StoppingCriteriaList


class CALMGenerationMixin(GenerationMixin):
    """`generate` for CALM: one backbone step per chunk of K tokens, batched over rows and candidates.

    The settings, special tokens, attention mask, length budget and stopping criteria are transformers' own
    (`GenerationMixin`'s preparation steps); the loop is CALM's: chunks of K tokens, a pool of candidates for T < 1.
    """

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: object | None = None,
        *,
        generator: torch.Generator | None = None,
        noise_sampler: NoiseSampler | None = None,
        tokenizer: object | None = None,
        custom_generate: str | Callable | None = None,
        **kwargs: object,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Generate text K tokens per step. Returns prompt + new tokens, [B, prompt_len + new_len].

        Takes transformers' usual arguments (`input_ids` / `inputs`, `attention_mask`, `generation_config`,
        `max_new_tokens`, `max_length`, `min_new_tokens`, `eos_token_id`, `pad_token_id`, `stopping_criteria`,
        `stop_strings` with `tokenizer`, `max_time`, `streamer`, `return_dict_in_generate`, `cache_implementation`)
        and CALM's own: `temperature` in (0, 1]; `num_candidates`, the pool of chunks drawn per step for T < 1 or
        `do_sample=False`; `prompt_alignment` ("left", or "reference": the authors' right-padding with [PAD]);
        `temperature_sampler` ("pool": the authors' batch algorithm; "exact": the paper's Algorithm 1).
        `generator` seeds the draws; `noise_sampler(shape, device, dtype)` replaces the head's random draws (for
        replaying them). Every stopping criterion, EOS and stop strings included, is checked after each token, so a
        row ends exactly where it is met, even inside a chunk. `custom_generate` (a decoding loop, or a Hub
        repository) goes to transformers' `generate`, which prepares the inputs and runs it instead of CALM's loop.
        """
        if custom_generate is not None:
            return GenerationMixin.generate(
                self, inputs, generation_config, stopping_criteria=stopping_criteria, streamer=streamer,
                tokenizer=tokenizer, custom_generate=custom_generate, **kwargs,
            )  # fmt: skip
        for name in UNSUPPORTED_ARGUMENTS:
            if kwargs.pop(name, None):
                raise ValueError(f"CALM generation does not support {name}: CALM has no token logits to process.")
        config, input_ids, attention_mask = self._prepare_generation(inputs, generation_config, generator, kwargs)
        criteria = self._get_stopping_criteria(config, stopping_criteria or StoppingCriteriaList(), tokenizer)
        run = self._start_generation(input_ids, attention_mask, config, criteria, streamer)
        while True:
            hidden = self._backbone_step(run)  # [B, d]
            chunk = self._draw_chunk(hidden, config, generator, noise_sampler)  # [B, K]
            if self._append_chunk(run, chunk, streamer):
                break
        if streamer is not None:
            streamer.end()
        return GenerateDecoderOnlyOutput(sequences=run.sequences) if config.return_dict_in_generate else run.sequences

    def _prepare_generation(
        self,
        inputs: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        generator: torch.Generator | None,
        kwargs: dict,
    ) -> tuple[GenerationConfig, torch.Tensor, torch.Tensor]:
        """The settings of this call (checked, with transformers' special tokens and length budget), the prompt ids
        [B, T] and their mask [B, T] (inferred from the pad token as transformers does, if absent)."""
        input_ids = kwargs.pop("input_ids", inputs)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (or inputs): a [batch_size, length] tensor of prompt ids.")
        attention_mask = kwargs.pop("attention_mask", None)
        default_max_length = kwargs.get("max_length") is None and _has_default_max_length(
            generation_config or self.generation_config
        )
        config = self._calm_generation_config(generation_config, kwargs)
        if isinstance(input_ids, torch.Tensor):  # before check_input_ids reads the ids on their device
            _check_devices(input_ids.device, self.device, attention_mask, generator)
        check_input_ids(input_ids, self.config.vocab_size)
        self._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
        if attention_mask is None:
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, config, {})
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("every prompt needs at least one token: a row of attention_mask is all zeros.")
        prompt_len = input_ids.shape[1]
        config = self._prepare_generated_length(config, default_max_length, True, "input_ids", prompt_len, input_ids)
        if config.max_length <= prompt_len:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) is already max_length={config.max_length} tokens long; set "
                "max_new_tokens instead, or a larger max_length."
            )
        return config, input_ids, attention_mask

    def _calm_generation_config(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """transformers' merge of the model's generation config, `generation_config` and kwargs, with CALM's own
        settings (from kwargs, else the config, else CALM's defaults). Settings CALM cannot use raise or warn."""
        calm_settings = {key: kwargs.pop(key) for key in CALM_SETTINGS if key in kwargs}
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        unknown = set(model_kwargs) - set(IGNORED_MODEL_KWARGS)
        if unknown:
            raise ValueError(f"generate() got arguments CALM does not use: {sorted(unknown)}.")
        for key in CALM_SETTINGS:
            saved = getattr(config, key, None)
            calm_settings.setdefault(key, CALM_GENERATION_DEFAULTS[key] if saved is None else saved)
        for key, value in calm_settings.items():
            setattr(config, key, value)
        _check_calm_settings(config)
        _warn_about_ignored_settings(config)
        return config

    def _start_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        criteria: StoppingCriteriaList,
        streamer: object | None,
    ) -> GenerationRun:
        """Align the prompts into chunks, set up the cache and masks, and embed the prompts' chunks."""
        k, (batch_size, prompt_len) = self.config.patch_size, input_ids.shape
        pad_token_id = 0 if config._pad_token_tensor is None else int(config._pad_token_tensor)
        ids, token_mask = align_prompts(input_ids, attention_mask, k, pad_token_id, config.prompt_alignment)
        num_chunks = ids.shape[1] // k + -(-(config.max_length - prompt_len) // k)
        if num_chunks > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens need {num_chunks} chunks of {k} tokens, more than the model's "
                f"max_position_embeddings={self.config.max_position_embeddings} chunks; shorten the prompt or "
                "max_new_tokens."
            )
        if streamer is not None:
            streamer.put(input_ids.cpu())

        chunk_mask = position_ids = None  # no padded chunk: the backbone's own causal mask and positions are these
        if not bool(token_mask.all()):
            chunk_mask = chunk_mask_of(token_mask, k)
            position_ids = positions_of(chunk_mask)
            chunk_mask = F.pad(chunk_mask, (0, num_chunks - chunk_mask.shape[1]), value=1)  # new chunks are real
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria) and criterion.max_position_embeddings is not None:
                # Its reminder that the text outgrew the model reads max_position_embeddings as tokens: CALM's counts
                # chunks of K tokens.
                criterion.max_position_embeddings = self.config.max_position_embeddings * k
        static = config.cache_implementation == "static"
        # The backbone reads the prompt's chunks and every new chunk but the last.
        cache = StaticCache(config=self.config, max_cache_len=num_chunks - 1) if static else None
        return GenerationRun(
            sequences=input_ids,
            unfinished=torch.ones(batch_size, dtype=torch.bool, device=input_ids.device),
            chunk_embeds=self.embed_chunks(ids, token_mask),
            chunk_mask=chunk_mask,
            position_ids=position_ids,
            cache=cache,
            cached=0,
            static=static,
            max_length=config.max_length,
            min_length=config.min_length or 0,
            pad_token_id=pad_token_id,
            criteria=StoppingCriteriaList(c for c in criteria if not isinstance(c, EosTokenCriteria)),
            eos_criteria=StoppingCriteriaList(c for c in criteria if isinstance(c, EosTokenCriteria)),
        )

    def _backbone_step(self, run: GenerationRun) -> torch.Tensor:
        """Read the chunks not yet in the cache; return the last backbone state of each row, [B, d]."""
        reading = run.chunk_embeds.shape[1]
        mask = run.chunk_mask
        if mask is not None and not run.static:  # a dynamic cache takes the mask of its past and current chunks
            mask = mask[:, : run.cached + reading]
        slots = torch.arange(run.cached, run.cached + reading, device=run.chunk_embeds.device) if run.static else None
        hidden, run.cache, _ = self.backbone(
            run.chunk_embeds, mask, run.position_ids, run.cache, cache_position=slots, use_cache=True
        )
        run.cached += reading
        return hidden[:, -1]

    def _draw_chunk(
        self,
        hidden: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
        noise_sampler: NoiseSampler | None,
    ) -> torch.Tensor:
        """hidden [B, d] -> the next chunk's token ids [B, K], sampled at the call's temperature."""
        temperature = 1.0 if config.temperature is None else float(config.temperature)
        do_sample = bool(config.do_sample)
        if do_sample and temperature < 1.0 and config.temperature_sampler == "exact":
            return self._exact_chunk(hidden, temperature, config.num_candidates, generator, noise_sampler)
        pool = 1 if do_sample and temperature == 1.0 else config.num_candidates
        samples = (hidden.shape[0],) if pool == 1 else (hidden.shape[0], pool)
        noise = (
            None
            if noise_sampler is None
            else noise_sampler(self.generative_head.noise_shape(samples), hidden.device, hidden.dtype)
        )
        if pool == 1:  # T = 1: the one draw per row is the sample
            latents = self.generative_head.sample(hidden, noise, generator)  # [B, l]
            return self.ae_model.decode_tokens(latents.unsqueeze(1))  # [B, K]
        latents = self.generative_head.sample(hidden, noise, generator, num_samples=pool)  # [B, N, l]
        decoder = self.ae_model.decoder
        token_states = decoder.token_states(decoder.chunk_state(latents))  # [B, N, K, a]
        same, tokens = identical_chunks(token_states, self.ae_model.argmax_tokens)
        choice = sample_from_pool(same, temperature, do_sample, generator)  # [B]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        chunk, missing = tokens[rows, choice], tokens[rows, choice] < 0  # [B, K]: the tokens after a unique prefix
        if bool(missing.any()):
            chunk[missing] = self.ae_model.argmax_tokens(token_states[rows, choice][missing])
        return chunk

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
                    noise = noise_sampler(self.generative_head.noise_shape((1, m)), hidden.device, hidden.dtype)
                latents = self.generative_head.sample(hidden[row : row + 1], noise, generator, num_samples=m)
                return self.ae_model.decode_tokens(latents.transpose(0, 1))  # [m, 1, l] -> [m, K]

            return draw

        rows = range(hidden.shape[0])
        return torch.stack(
            [exact_temperature_sampling(draws_for(row), temperature, generator, draws_per_call) for row in rows]
        )

    def _append_chunk(self, run: GenerationRun, chunk: torch.Tensor, streamer: object | None) -> bool:
        """Append a chunk [B, K] to each row (padding for finished rows; a row stops at the first token that meets a
        stopping criterion, even inside a chunk), stream it, and prepare the next step. Returns True when done."""
        chunk = chunk[:, : run.max_length - run.sequences.shape[1]]  # [B, <=K]
        chunk = chunk.masked_fill(~run.unfinished[:, None], run.pad_token_id)
        stops = self._stops_in_chunk(run, chunk)  # [B, <=K]
        after_stop = (stops.long().cumsum(-1) - stops.long()) > 0
        chunk = chunk.masked_fill(after_stop, run.pad_token_id)
        run.unfinished &= ~stops.any(-1)
        if not bool(run.unfinished.any()):  # every row has stopped: end where the last one did, as transformers does
            used = torch.where(stops.any(-1), stops.long().argmax(-1) + 1, 0)  # [B]: tokens up to each row's stop
            chunk = chunk[:, : int(used.max())]
        run.sequences = torch.cat([run.sequences, chunk], dim=-1)
        if streamer is not None:
            for column in chunk.T.cpu():  # one token per put, as transformers' generate streams
                streamer.put(column)
        if not bool(run.unfinished.any()) or run.sequences.shape[1] >= run.max_length:
            return True
        run.chunk_embeds = self.embed_chunks(chunk)
        if run.position_ids is not None:
            run.position_ids = run.position_ids[:, -1:] + 1
        return False

    @staticmethod
    def _stops_in_chunk(run: GenerationRun, chunk: torch.Tensor) -> torch.Tensor:
        """[B, <=K] bool: where each row meets a stopping criterion, checked after each token of the chunk as
        transformers checks after each generated token. EOS counts from `min_length` on (CALM cannot keep the head
        from drawing it earlier; an early EOS stays in the text)."""
        sequences = torch.cat([run.sequences, chunk], dim=-1)
        start = run.sequences.shape[1]
        stops = []
        for length in range(start + 1, sequences.shape[1] + 1):
            stop = run.criteria(sequences[:, :length], None)
            if len(run.eos_criteria) and length > run.min_length:
                stop = stop | run.eos_criteria(sequences[:, :length], None)
            stops.append(stop.to(run.unfinished.device))
        return torch.stack(stops, dim=-1) & run.unfinished[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Settings


def _check_calm_settings(config: GenerationConfig) -> None:
    """Raise a clear error for settings CALM's generation cannot honour."""
    for key in UNSUPPORTED_COUNTS:
        if (getattr(config, key, None) or 1) != 1:
            raise ValueError(f"CALM generation does not support {key}={getattr(config, key)!r}; use 1.")
    if config.do_sample:  # without sampling the temperature does nothing (an OpenAI temperature of 0 sends both)
        inverse_temperature(1.0 if config.temperature is None else float(config.temperature))
    if (
        not isinstance(config.num_candidates, int)
        or isinstance(config.num_candidates, bool)
        or config.num_candidates < 1
    ):
        raise ValueError(
            "num_candidates (the pool of chunks drawn per step) must be a positive integer, "
            f"got {config.num_candidates!r}."
        )
    if config.prompt_alignment not in PROMPT_ALIGNMENTS:
        raise ValueError(f"prompt_alignment must be one of {PROMPT_ALIGNMENTS}, got {config.prompt_alignment!r}.")
    if config.temperature_sampler not in TEMPERATURE_SAMPLERS:
        raise ValueError(
            "temperature_sampler must be 'pool' (the authors' batch algorithm over num_candidates chunks) or "
            f"'exact' (the paper's Algorithm 1), got {config.temperature_sampler!r}."
        )
    if config.cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            "CALM generation supports cache_implementation None or 'dynamic' (the default, a DynamicCache) and "
            f"'static' (a StaticCache), got {config.cache_implementation!r}."
        )


def _warn_about_ignored_settings(config: GenerationConfig) -> None:
    """Warn about token-logit settings at a value that acts: CALM has no token logits for them to act on."""
    ignored = {
        key: value
        for key, inert in TOKEN_LOGIT_SETTINGS.items()
        if (value := getattr(config, key, None)) not in (None, [], {}, *inert)
    }
    if ignored:
        settings = ", ".join(f"{key}={value!r}" for key, value in ignored.items())
        warnings.warn(
            f"CALM generation ignores {settings}: these act on or return token logits, which CALM does not have "
            "(it draws whole chunks of K tokens from its energy head). To shape the sampling, use temperature in "
            "(0, 1] and num_candidates.",
            UserWarning,
            stacklevel=5,  # the caller of generate
        )


def _has_default_max_length(config: GenerationConfig) -> bool:
    """Whether `max_length` was left at transformers' default (then `generate` makes 20 new tokens by default)."""
    return config.max_length is None or config.max_length == GenerationConfig().max_length


def _check_devices(
    device: torch.device, model_device: torch.device, attention_mask: torch.Tensor | None, generator: object
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
