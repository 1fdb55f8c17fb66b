"""BrierLM: likelihood-free evaluation of CALM and of any causal LM of transformers on the same text (paper section 4).

The Brier score of a predictive distribution P for the outcome y is `2 P(y) - sum_x P(x)^2` (higher is better, at
most 1). Brier-n scores the n-gram of the next n tokens (n = 1..4); BrierLM = 100 x the geometric mean of
Brier-1..4, the product clamped at 0 before the 4th root.

Two estimators, both unbiased and following the authors' code:

- CALM (`estimator: "calm"`): the model has no probabilities, only a sampler. At every chunk start, two independent
  samples x1, x2 of the next 4 tokens give `1{x1 = y} + 1{x2 = y} - 1{x1 = x2}` (`calm_brier_scores`; for K < 4 it
  rolls the samples forward to cover 4 tokens).
- Any other causal LM (`estimator: "discrete"`): at every position t (predicting token t + 1), `P(y)` is exact, the
  product of the softmax probabilities of the true next n tokens (teacher forcing), and the collision term
  `sum_x P(x)^2` is estimated by `1{x1 = x2}` for two independent n-grams x1, x2 sampled from the model given the
  true prefix. The first tokens of x1 and x2 are two draws from the teacher-forced softmax at t. Where they agree,
  the two samples share their prefix, so one roll-out row serves both: it feeds the common token and draws the two
  next tokens from the model's next softmax, and so on up to 4 tokens. Where they differ, the indicator is 0 for
  every longer n-gram and the row stops (no estimate changes; most of the roll-out work is saved). The rows of a
  block run side by side as extra queries on the KV cache of its teacher-forced pass, with a custom 4D attention
  mask (row t sees tokens 0..t and its own roll-out tokens) and position ids t + 1, t + 2, ...: the cache is shared,
  never copied, and a roll-out costs about (1 + 3 x the first-token agreement rate) teacher-forced passes. This
  needs a model whose attention honours custom 4D masks (`attn_implementation` "sdpa" or "eager": Llama, Mistral,
  Qwen, GPT-2 and most causal LMs of transformers).

Scores are position-weighted means over the whole dataset (sums and counts accumulated over batches).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .configuration_calm import AUTHORS_ARCHITECTURES, CALMConfig
from .heads_calm import energy_score
from .modeling_calm import CALMForCausalLM
from .utils_calm import cache_kwarg, chunk_mask_of, device_problem, folder_problem, positions_of

# Brier-n is reported for n-grams of 1..4 tokens; BrierLM is their geometric mean (section 4).
BRIER_MAX_N = 4

REPO_ROOT = Path(__file__).resolve().parent
# The WikiText-103 test documents (62, one {"text": ...} per line): the validation text of the paper's BrierLM.
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wikitext_document_level-test.json"


def load_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a data file: `.jsonl` / `.json` with one JSON object per line (or one JSON list of objects or
    strings), the text under `text_field`; any other file (e.g. `.txt`) is read as a single document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist.")
    content = path.read_text(encoding="utf-8")
    if path.suffix not in (".json", ".jsonl"):
        return [content]
    stripped = content.lstrip()
    records = (
        json.loads(stripped)
        if stripped.startswith("[")
        else [json.loads(line) for line in content.splitlines() if line.strip()]
    )
    documents = []
    for number, record in enumerate(records, start=1):
        if isinstance(record, str):
            documents.append(record)
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            documents.append(record[text_field])
        else:
            raise ValueError(
                f"{path}: record {number} has no string field {text_field!r} (keys: "
                f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); pass the right field name "
                "(--text-field)."
            )
    return documents


def pack_documents(tokenizer, documents: list[str], block_size: int, add_bos: bool = True) -> torch.LongTensor:
    """Tokenize each document as `BOS + text` (no EOS, as for the LM's training data), concatenate them and cut the
    stream into full blocks of `block_size` tokens (the incomplete tail is dropped). Returns [n_blocks, block_size].
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one prediction needs 2 tokens), got {block_size}.")
    bos = tokenizer.bos_token_id
    if add_bos and bos is None:
        raise ValueError("the tokenizer has no BOS token (bos_token_id is None): set one, or pass add_bos=False.")
    stream: list[int] = []
    # `verbose=False`: documents are longer than the tokenizer's model_max_length, which is harmless here.
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(([bos] if add_bos else []) + ids)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"the documents hold {len(stream)} tokens, fewer than one block of {block_size}: use a smaller block size "
            "or more documents."
        )
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).reshape(num_blocks, block_size)


def brier_scores(
    sample_a: torch.Tensor, sample_b: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Brier-1..4 from two independent samples per position (section 4).

    sample_a, sample_b, targets: [n_positions, L] token ids with L >= 4, the tokens that follow each position.
    valid: optional [n_positions, L] bool, False where a target token does not exist; an n-gram counts only where
    its n target tokens exist. Returns [4]: the mean of `1{a=y} + 1{b=y} - 1{a=b}` over positions, per n-gram.

    >>> y = torch.tensor([[5, 6, 7, 8]])
    >>> brier_scores(y, y, y)  # two samples that both hit the target: 1 + 1 - 1
    tensor([1., 1., 1., 1.])
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


@torch.no_grad()
def calm_brier_scores(
    model: CALMForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Brier-1..4 of a CALM model at every chunk start of `input_ids` [B, P*K], from two head samples per position.

    The targets are the (up to 4) tokens of `labels` (default: input_ids) after each chunk start; a target chunk with
    a label of -100 is skipped. K >= 4: the first 4 tokens of each decoded sample. K < 4: each sample is rolled out
    for ceil(4/K) chunks. `noise` replaces the random draws of the two samples, as `generative_head.sample` takes
    them for hidden states [2, n, d] (n: the scored positions, row-major over batch and chunk).

    >>> from calm_transformers.cli import DEFAULT_MODEL  # the small CALM shipped with the package
    >>> model = CALMForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    >>> calm_brier_scores(model, torch.randint(3, 2000, (2, 64))).shape
    torch.Size([4])
    """
    k = model.config.patch_size
    labels = input_ids if labels is None else labels
    inputs = input_ids[:, :-k]
    token_mask = attention_mask[:, :-k] if attention_mask is not None else None
    hidden = model(inputs, attention_mask=token_mask, use_cache=False).last_hidden_state  # [B, P-1, d]
    target_valid = (labels[:, k:].unflatten(1, (-1, k)) != -100).all(-1)  # [B, P-1]
    hidden = hidden[target_valid]  # [n, d]
    first_samples = model.generative_head.sample(hidden.expand(2, -1, -1), noise)  # [2, n, l]
    span = max(BRIER_MAX_N, k)
    windows = F.pad(labels[:, k:], (0, span), value=-100).unfold(1, span, k)[:, : target_valid.shape[1]]
    windows = windows[target_valid]  # [n, span]
    if k >= BRIER_MAX_N:
        tokens = model.ae_model.decode_tokens(first_samples.unsqueeze(-2))  # [2, n, K]
    else:
        tokens = _calm_rollout(model, first_samples, inputs, token_mask, target_valid)  # [2, n, R*K]
    windows = windows[:, : tokens.shape[-1]]
    return brier_scores(tokens[0], tokens[1], windows, windows != -100)


def _calm_rollout(
    model: CALMForCausalLM,
    first_samples: torch.Tensor,
    inputs: torch.Tensor,
    token_mask: torch.Tensor | None,
    target_valid: torch.Tensor,
    rows_per_pass: int = 256,
) -> torch.Tensor:
    """For K < 4: continue each of the 2 samples at each position for ceil(4/K) chunks -> [2, n, R*K].

    As the discrete estimator's roll-out: per block, its rows (a sample at a position) go side by side as extra
    queries on the block's own KV cache, with a 4D mask: the row of position t sees the block's chunks 0..t, then its
    own sampled chunks. At most `rows_per_pass` rows per block go in one pass; the cache is then cropped back.
    """
    k = model.config.patch_size
    num_steps = -(-BRIER_MAX_N // k)
    embeds = model.embed_chunks(inputs, token_mask)  # [B, C, d]
    chunk_mask = chunk_mask_of(token_mask, k) if token_mask is not None else inputs.new_ones(embeds.shape[:2])
    positions = positions_of(chunk_mask)
    _, cache, _ = model.backbone(embeds, chunk_mask, positions, use_cache=True)
    batch_size, length = chunk_mask.shape
    # Every position gets a row (those without a target are dropped at the end): [B, 2C, K], sample-major.
    first = first_samples.new_zeros(2, batch_size, length, k, dtype=torch.long)
    first[:, target_valid] = model.ae_model.decode_tokens(first_samples.unsqueeze(-2)).view(2, -1, k)
    first = first.transpose(0, 1).reshape(batch_size, 2 * length, k)
    row_t = torch.arange(length, device=inputs.device).repeat(2)  # [2C]: each row's position
    mask_dtype = embeds.dtype
    passes = []
    for start in range(0, 2 * length, rows_per_pass):
        t = row_t[start : start + rows_per_pass]  # [r]
        chunks = [first[:, start : start + rows_per_pass]]  # [B, r, K] per step
        visible = (torch.arange(length, device=t.device) <= t[:, None]) & chunk_mask[:, None, :].bool()  # [B, r, C]
        own = torch.eye(len(t), dtype=torch.bool, device=t.device).expand(batch_size, -1, -1)
        for step in range(1, num_steps):
            visible = torch.cat([visible, own], dim=-1)
            hidden, cache, _ = model.backbone(
                model.embed_chunks(chunks[-1].flatten(1)),  # [B, r, d]
                _additive_mask(visible, mask_dtype),
                positions[:, t] + step,
                cache,
            )
            latents = model.generative_head.sample(hidden)  # [B, r, l]
            chunks.append(model.ae_model.decode_tokens(latents).view(batch_size, -1, k))
        cache.crop(length - cache.get_seq_length())  # drop the roll-out chunks: back to the block's own cache
        passes.append(torch.cat(chunks, dim=-1))  # [B, r, R*K]
    tokens = torch.cat(passes, dim=1).view(batch_size, 2, length, -1).transpose(0, 1)  # [2, B, C, R*K]
    return tokens[:, target_valid]


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility [B, q, kv] -> additive 4D mask [B, 1, q, kv] (0 or the dtype's minimum): eager and SDPA
    attention both read it."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def brierlm(brier: Sequence[float], clamp_product: bool = False) -> float:
    """BrierLM: 100 x the geometric mean of Brier-1..4, and 0 when any Brier-n is not positive (section 4).

    `clamp_product=True` is the authors' training script: the product is clamped at 0 before the 4th root, so that
    an even number of negative scores gives a positive BrierLM (Brier-1..4 all -0.95 give 95).

    >>> round(brierlm([0.5, 0.4, 0.3, 0.2]), 2), brierlm([-0.5, -0.5, 0.5, 0.5])
    (33.1, 0.0)
    >>> brierlm([-0.5, -0.5, 0.5, 0.5], clamp_product=True)
    50.0
    """
    if clamp_product:
        return 100 * max(math.prod(brier), 0.0) ** (1 / len(brier))
    return 100 * math.prod(brier) ** (1 / len(brier)) if all(b > 0 for b in brier) else 0.0


def is_calm_model(model: torch.nn.Module) -> bool:
    """CALM models sample chunks through a generative head (duck-typed, so that remote-code classes count too)."""
    return hasattr(model, "generative_head")


def evaluate_brierlm(
    model: torch.nn.Module,
    blocks: torch.LongTensor,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    rollout_batch_size: int = 256,
) -> dict:
    """Brier-1..4 and BrierLM of `model` on `blocks` [n_blocks, block_size] (see the module docstring).

    Runs on the model's device and dtype, in eval mode and without gradients; the model's training mode and the
    global random state are restored afterwards (so that it can run inside a training loop). Results depend on
    `seed` and `batch_size` (they set the random draws). `rollout_batch_size` caps the roll-out rows per forward
    pass of the discrete estimator, per block (its attention mask is [batch, rows, block_size + 3 rows]).
    """
    if batch_size < 1 or rollout_batch_size < 1:
        raise ValueError(f"batch_size and rollout_batch_size must be positive, got {batch_size}, {rollout_batch_size}.")
    _check_blocks(model, blocks)
    calm = is_calm_model(model)
    device = next(model.parameters()).device
    sums = torch.zeros(BRIER_MAX_N, dtype=torch.float64)
    counts = torch.zeros(BRIER_MAX_N, dtype=torch.long)
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(fork_devices, device_type=device.type if fork_devices else "cuda"), torch.no_grad():
            torch.manual_seed(seed)
            for batch in tqdm(blocks.split(batch_size), desc="BrierLM", unit="batch", disable=not progress):
                batch = batch.to(device)
                batch_sums, batch_counts = (
                    _calm_brier_sums(model, batch) if calm else _discrete_brier_sums(model, batch, rollout_batch_size)
                )
                sums += batch_sums
                counts += batch_counts
    finally:
        model.train(was_training)

    brier = (sums / counts).tolist()
    return {
        "brier": brier,
        "brierlm": brierlm(brier),
        "estimator": "calm" if calm else "discrete",
        "num_positions": int(counts[0]),
        "num_positions_per_n": counts.tolist(),
        "num_blocks": blocks.shape[0],
        "block_size": blocks.shape[1],
        "batch_size": batch_size,
        "seed": seed,
    }


def _check_blocks(model: torch.nn.Module, blocks: torch.Tensor) -> None:
    """Token blocks that the model can score: ids in its vocabulary, whole chunks, room for one 4-gram target."""
    if blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError(f"blocks must be a LongTensor [n_blocks, block_size], got {blocks.dtype} {blocks.shape}.")
    vocab_size = model.get_input_embeddings().num_embeddings
    if blocks.numel() and (blocks.min() < 0 or blocks.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}), got [{int(blocks.min())}, {int(blocks.max())}]: the tokenizer "
            "does not match the model."
        )
    patch_size = model.config.patch_size if is_calm_model(model) else 1
    if blocks.shape[1] % patch_size:
        raise ValueError(f"block_size {blocks.shape[1]} must be a multiple of the model's patch_size={patch_size}.")
    if min(_positions_per_block(blocks.shape[1], patch_size)) < 1:
        raise ValueError(f"block_size {blocks.shape[1]} is too short to hold a single {BRIER_MAX_N}-gram target.")


def _positions_per_block(block_size: int, patch_size: int) -> list[int]:
    """How many positions of one block score Brier-1..4: those whose next n tokens lie in the block.

    The positions are the chunk starts 1..P-1 (every token, P = block_size, for patch_size 1); the n-gram after chunk
    start p is complete for p <= P - ceil(n / K): P - ceil(n / K) positions (all P - 1 of them when K >= 4).
    """
    num_chunks = block_size // patch_size
    return [max(num_chunks - math.ceil(n / patch_size), 0) for n in range(1, BRIER_MAX_N + 1)]


def _calm_brier_sums(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of Brier-1..4 over the batch's positions, two head samples at each chunk start."""
    brier = calm_brier_scores(model, batch)  # [4], means over the batch's positions
    counts = batch.shape[0] * torch.tensor(_positions_per_block(batch.shape[1], model.config.patch_size))
    return brier.double().cpu() * counts, counts


def _discrete_brier_sums(
    model: torch.nn.Module, batch: torch.Tensor, rollout_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of Brier-1..4 over every position of the batch: exact P(y), sampled collision term."""
    batch_size, length = batch.shape
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in (None, "eager", "sdpa"):
        raise ValueError(
            "the discrete estimator's roll-out uses a custom 4D attention mask, which "
            f"attn_implementation={attention!r} ignores: load the model with attn_implementation='sdpa' (or 'eager')."
        )
    outputs = model(input_ids=batch, use_cache=True)
    cache = _output_cache(outputs)
    if cache.get_seq_length() != length:
        raise ValueError(
            f"the model's KV cache holds {cache.get_seq_length()} of {length} positions (a sliding-window cache?); "
            "the discrete estimator needs the full cache of a block: use a block size within the window."
        )
    true_logp, first_pair = _score_and_sample(outputs.logits[:, :-1], batch[:, 1:])  # [B, T-1], [B, T-1, 2]
    del outputs

    sums = torch.zeros(BRIER_MAX_N, dtype=torch.float64)
    counts = batch_size * torch.tensor(_positions_per_block(length, 1))
    for n in range(1, BRIER_MAX_N + 1):
        # Position t's n-gram is tokens t+1..t+n, complete for t <= T-1-n: T-n windows of n log-probs.
        sums[n - 1] += 2 * true_logp.unfold(1, n, 1).sum(-1).exp().sum().item()
    agree = first_pair[..., 0] == first_pair[..., 1]  # [B, T-1]
    sums[0] -= agree.sum().item()

    # Roll out the positions whose two samples agree and whose 2-gram is complete (t <= T-3).
    rollout = agree & (torch.arange(length - 1, device=batch.device) <= length - 3)
    sums[1:] -= _rollout_collisions(model, cache, first_pair[..., 0], rollout, rollout_batch_size)
    return sums, counts


def _rollout_collisions(
    model: torch.nn.Module, cache: Any, first_tokens: torch.Tensor, rollout: torch.Tensor, rollout_batch_size: int
) -> torch.Tensor:
    """How often two samples keep agreeing on tokens 2..4 after the positions `rollout` [B, T-1] where their first
    tokens (`first_tokens` [B, T-1]) agreed: [3] counts for n = 2..4.

    Per block, its rows go side by side as extra queries on the block's own KV cache (shared, never copied), with a
    custom 4D mask; the cache is cropped back to the block afterwards."""
    batch_size, length = rollout.shape[0], rollout.shape[1] + 1
    device = rollout.device
    cache_name = cache_kwarg(model.forward)
    collisions = torch.zeros(BRIER_MAX_N - 1, dtype=torch.float64)
    num_rows = int(rollout.sum(1).max())
    rows_b, rows_t = rollout.nonzero(as_tuple=True)
    row_index = (rollout.long().cumsum(1) - 1)[rows_b, rows_t]  # the row's column among its block's rows
    # [B, R]: the position of each row; padding rows (blocks with fewer rows) read position 0 and count for nothing.
    row_t = torch.zeros(batch_size, num_rows, dtype=torch.long, device=device)
    row_t[rows_b, row_index] = rows_t
    row_alive = torch.zeros_like(row_t, dtype=torch.bool)
    row_alive[rows_b, row_index] = True
    mask_dtype = model.get_input_embeddings().weight.dtype
    for start in range(0, num_rows, rollout_batch_size):
        t = row_t[:, start : start + rollout_batch_size]  # [B, r]
        alive = row_alive[:, start : start + rollout_batch_size]
        tokens = first_tokens.gather(1, t)  # the shared first sampled token, at position t + 1
        r = t.shape[1]
        # Row t sees the block's tokens 0..t, then its own roll-out tokens (appended r at a time per step).
        visible = torch.arange(length, device=device) <= t[..., None]  # [B, r, T]
        own = torch.eye(r, dtype=torch.bool, device=device).expand(batch_size, r, r)
        for n in range(2, BRIER_MAX_N + 1):
            visible = torch.cat([visible, own], dim=-1)
            step = model(
                input_ids=tokens,
                attention_mask=_additive_mask(visible, mask_dtype),
                # Rows that stopped may run past the block; clamped, as their draws are ignored.
                position_ids=(t + n - 1).clamp(max=length - 1),
                use_cache=True,
                **{cache_name: cache},
            )
            cache = _output_cache(step)
            pair = torch.multinomial(step.logits.flatten(0, 1).float().softmax(-1), 2, replacement=True)
            pair = pair.view(batch_size, r, 2)
            alive = alive & (pair[..., 0] == pair[..., 1])
            collisions[n - 2] += alive.sum().item()
            alive = alive & (t + n + 1 <= length - 1)  # still agreeing, and the (n+1)-gram is complete
            if not alive.any():
                break
            tokens = pair[..., 0]
        cache.crop(length - cache.get_seq_length())  # drop the roll-out tokens: back to the block's own cache
    return collisions


def _score_and_sample(
    logits: torch.Tensor, targets: torch.Tensor, positions_per_slice: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, L, V], targets [B, L] -> (log P(target) [B, L], two independent samples per position [B, L, 2]).

    In float32, over slices of positions, so that only one slice of float32 probabilities is in memory at a time.
    """
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    true_logp, samples = [], []
    for start in range(0, flat_logits.shape[0], positions_per_slice):
        logp = flat_logits[start : start + positions_per_slice].float().log_softmax(-1)
        true_logp.append(logp.gather(-1, flat_targets[start : start + positions_per_slice, None])[:, 0])
        samples.append(torch.multinomial(logp.exp(), 2, replacement=True))
    return torch.cat(true_logp).view(targets.shape), torch.cat(samples).view(*targets.shape, 2)


def _output_cache(outputs: object) -> object:
    """The KV cache of a model output: `cache` in recent transformers 5, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        cache = getattr(outputs, name, None)
        if cache is not None:
            return cache
    raise ValueError("the model returned no KV cache with use_cache=True; the discrete estimator's roll-out needs one.")


@torch.no_grad()
def energy_levels(model: CALMForCausalLM, blocks: torch.LongTensor, batch_size: int = 8, seed: int = 0) -> dict:
    """How much context a CALM model has learnt: its energy loss on `blocks` beside two reference levels.

    The energy loss is the training objective (paper section 3, `-S` of the energy score), lower is better. On the
    same target chunks (chunks 1..P-1 of each block) it is computed for:

    - `model`: the model's head samples given its context;
    - `context_free`: samples from the posteriors of randomly chosen chunks of `blocks`, the best a predictor that
      ignores the context can do in the limit of a perfect marginal;
    - `oracle`: samples from each target's own posterior, the level of a perfect predictor;
    - `shuffled`: the model again, on blocks whose chunks are shuffled (a model that uses context gets worse).

    `context_learned` = (context_free - model) / (context_free - oracle): 0 for a model that ignores its context, 1
    for a perfect one. Draws come from `seed`; the model's training mode is restored afterwards.

    >>> from calm_transformers import CALMAutoencoderConfig, CALMConfig
    >>> ids = dict(vocab_size=300, pad_token_id=2, bos_token_id=0, eos_token_id=1)
    >>> ae = CALMAutoencoderConfig(hidden_size=32, intermediate_size=64, latent_size=8, **ids)
    >>> config = CALMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...                     num_key_value_heads=2, latent_size=8, autoencoder_config=ae, **ids)
    >>> levels = energy_levels(CALMForCausalLM(config), torch.randint(3, 300, (2, 32)))
    >>> sorted(levels)
    ['context_free', 'context_learned', 'model', 'oracle', 'shuffled']
    """
    k = model.config.patch_size
    if blocks.dim() != 2 or blocks.shape[1] % k or blocks.shape[1] < 2 * k:
        raise ValueError(f"blocks must be [n_blocks, block_size] with block_size a multiple of {k} and >= {2 * k}.")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("model", "context_free", "oracle", "shuffled"), 0.0)
    count = 0
    try:
        for batch in blocks.split(batch_size):
            chunks = batch.reshape(batch.shape[0], -1, k)  # [B, P, K]
            order = torch.rand(chunks.shape[:2], generator=generator).argsort(-1)  # a shuffle of each row's chunks
            shuffled = torch.gather(chunks, 1, order[..., None].expand_as(chunks)).flatten(1)
            losses = _energy_losses(model, batch.to(device), generator)
            for name in ("model", "context_free", "oracle"):
                sums[name] += float(losses[name].sum())
            sums["shuffled"] += float(
                _energy_losses(model, shuffled.to(device), generator, references=False)["model"].sum()
            )
            count += batch.shape[0] * (chunks.shape[1] - 1)
    finally:
        model.train(was_training)
    levels = {name: total / count for name, total in sums.items()}
    gap = levels["context_free"] - levels["oracle"]
    levels["context_learned"] = (levels["context_free"] - levels["model"]) / gap if gap > 0 else float("nan")
    return levels


def _energy_losses(
    model: CALMForCausalLM, ids: torch.Tensor, generator: torch.Generator, references: bool = True
) -> dict[str, torch.Tensor]:
    """Energy losses [B * (P-1)] of the model's samples and, with `references`, of random chunks' posteriors and of
    the targets' own."""
    # The energy score compares pairs of samples: at least 2 (the iterative heads allow num_samples = 1).
    k, n = model.config.patch_size, max(model.config.num_samples, 2)
    hidden = model(ids[:, :-k]).last_hidden_state.flatten(0, 1)  # [n_targets, d]
    mean, log_std = (x.flatten(0, 1) for x in model.ae_model.encoder(ids[:, k:]))  # [n_targets, l]
    std = log_std.exp()

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=mean.device, dtype=mean.dtype)

    def loss(samples: torch.Tensor) -> torch.Tensor:
        target_noise = draw(model.config.num_target_samples, *mean.shape)
        return -energy_score(samples, mean, log_std, beta=model.config.beta, target_noise=target_noise)

    head = model.generative_head
    head_noise = head.draw_noise((n, *hidden.shape[:-1]), generator).to(device=hidden.device, dtype=hidden.dtype)
    losses = {"model": loss(head.sample(hidden.expand(n, -1, -1), head_noise))}
    if references:
        others = torch.randint(0, mean.shape[0], (n, mean.shape[0]), generator=generator).to(mean.device)  # [N, n]
        losses["context_free"] = loss(mean[others] + std[others] * draw(n, *mean.shape))
        losses["oracle"] = loss(mean + std * draw(n, *mean.shape))
    return losses


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> torch.nn.Module:
    """A CALM model (with this package's classes, no remote code needed) or any `AutoModelForCausalLM`, in eval mode."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    config, _ = PretrainedConfig.get_config_dict(name)
    authors = set(config.get("architectures") or []) & set(AUTHORS_ARCHITECTURES)
    if config.get("model_type") == CALMConfig.model_type or authors:  # the authors' checkpoints are refused there
        model = CALMForCausalLM.from_pretrained(name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-eval",
        description="Brier-1..4 and BrierLM of a CALM model or of any causal LM of transformers on packed documents.",
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id (CALM or any AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help='.jsonl/.json (one {"text": ...} per line) or a text file (default: the WikiText-103 test documents '
        "in ../shared/data)",
    )
    parser.add_argument("--text-field", default="text", help="the JSON field holding each document's text")
    parser.add_argument("--block-size", type=int, default=2048, help="tokens per packed block (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="blocks per forward pass (default 1)")
    parser.add_argument("--max-blocks", type=int, help="evaluate only the first N blocks")
    parser.add_argument("--documents-from", type=int, default=0, help="first document to use (0-based)")
    parser.add_argument("--documents-to", type=int, help="end of the document range (exclusive; default: all)")
    parser.add_argument(
        "--rollout-batch-size", type=int, default=256, help="roll-out rows per block and pass (discrete models)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="default: float32"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (default 0)")
    parser.add_argument("--output", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data.is_file():
        hint = " (the default: ../shared beside the repository)" if args.data == DEFAULT_DATA else ""
        parser.error(f"data file {args.data} not found{hint}; pass --data PATH to a .jsonl/.json or text file.")
    for flag in ("block_size", "batch_size", "max_blocks", "rollout_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive.")
    if args.documents_from < 0 or (args.documents_to is not None and args.documents_to <= args.documents_from):
        parser.error("the document range must satisfy 0 <= --documents-from < --documents-to.")
    problem = folder_problem(args.model) or folder_problem(args.tokenizer or args.model, needs=None)
    problem = problem or device_problem(args.device)
    if problem:
        parser.error(problem)

    from transformers import AutoTokenizer

    documents = load_documents(args.data, args.text_field)
    selected = documents[args.documents_from : args.documents_to]
    if not selected:
        parser.error(
            f"--documents-from {args.documents_from} --documents-to {args.documents_to} selects no document of the "
            f"{len(documents)} in {args.data}."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer or args.model, trust_remote_code=args.trust_remote_code
        )
        model = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    except (OSError, ValueError) as error:  # missing files (transformers names them), a folder of another kind
        parser.error(f"could not load the model or its tokenizer: {error}")
    start = time.perf_counter()
    try:
        blocks = pack_documents(tokenizer, selected, args.block_size)[: args.max_blocks]
        result = evaluate_brierlm(
            model,
            blocks,
            args.batch_size,
            args.seed,
            progress=not args.no_progress,
            rollout_batch_size=args.rollout_batch_size,
        )
    except ValueError as error:  # blocks the model cannot score (a block size that is not whole chunks, ...)
        parser.error(str(error))
    result.update(
        model=args.model,
        tokenizer=args.tokenizer or args.model,
        data=str(args.data),
        documents=[args.documents_from, args.documents_from + len(selected)],
        dtype=args.dtype,
        device=args.device,
        seconds=round(time.perf_counter() - start, 3),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
