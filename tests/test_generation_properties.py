"""Property-based checks of generate(): any K, batch, padding, prompt lengths and max_new_tokens."""

from __future__ import annotations

import functools

import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

PAD = 95


@functools.cache
def model_for(patch_size: int):
    return tiny_model(patch_size=patch_size)


@settings(max_examples=30, deadline=None)
@given(
    patch_size=st.sampled_from([1, 2, 3, 4, 8]),
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    pad_left=st.booleans(),
    max_new_tokens=st.integers(1, 10),
    temperature=st.sampled_from([1.0, 0.5, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_generate_shapes_and_prompt(patch_size, lengths, pad_left, max_new_tokens, temperature, seed):
    model = model_for(patch_size)
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if pad_left else slice(0, n)
        ids[row, cols] = torch.randint(3, 90, (n,), generator=g)
        mask[row, cols] = 1
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        num_candidates=8,
        eos_token_id=None,
        generator=g,
    )
    assert out.shape == (len(lengths), width + max_new_tokens)
    assert torch.equal(out[:, :width], ids)
    assert ((out[:, width:] >= 0) & (out[:, width:] < 96)).all()
