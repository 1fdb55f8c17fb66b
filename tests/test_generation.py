"""generate(): chunked decoding through the standard interfaces, stopping, sampling and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from calm_transformers.generation_calm import ShortlistArgmax, align_prompts, plain_argmax, temperature_sampling
from conftest import DEVICES, on_device, require_torch_compile, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

VOCAB = 96
PAD, EOS = VOCAB - 1, 2


def noise_table(rows: int, steps: int, noise_size: int = 8, pool: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, steps, pool, noise_size, generator=g) - 0.5


def replay(table: torch.Tensor, rows: list[int]):
    """A noise_sampler that hands out the draws of `rows` of `table`, one step per call."""
    step = iter(range(table.shape[1]))

    def sampler(shape, device, dtype):
        s = next(step)
        return table[rows, s].reshape(shape).to(device, dtype)

    return sampler


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny_model(patch_size=4)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_one_by_one(model, device):
    """T = 1 (one head sample per row and step): left-padded rows of different lengths give the tokens they give alone.
    (At T < 1 the pick draws from one generator for the whole batch; see the do_sample=False test below.)"""
    model = on_device(model, device)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    table = noise_table(len(prompts), 6)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.0, eos_token_id=None)
    ids, mask = (t.to(device) for t in left_pad(prompts))
    batched = model.generate(ids, attention_mask=mask, noise_sampler=replay(table, [0, 1, 2]), **kwargs)
    assert batched.shape == (3, ids.shape[1] + 10)
    assert torch.equal(batched[:, : ids.shape[1]], ids)  # the prompt is returned as given
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt], device=device), noise_sampler=replay(table, [row]), **kwargs)
        assert alone[0, len(prompt) :].tolist() == batched[row, ids.shape[1] :].tolist()


def test_batched_candidate_pools_equal_one_by_one(model):
    """With do_sample=False the pick is deterministic given the pool: batched == one-by-one at T < 1 too."""
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
    table = noise_table(2, 4, pool=12)
    kwargs = dict(max_new_tokens=12, do_sample=False, num_samples=12, eos_token_id=None)
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, attention_mask=mask, noise_sampler=replay(table, [0, 1]), **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), noise_sampler=replay(table, [row]), **kwargs)
        assert alone[0, len(prompt) :].tolist() == batched[row, ids.shape[1] :].tolist()


def test_right_padded_prompts_equal_left_padded(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21]]
    table = noise_table(2, 4)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, eos_token_id=None)
    ids, mask = left_pad(prompts)
    right_ids = torch.tensor([p + [PAD] * (7 - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (7 - len(p)) for p in prompts])
    left = model.generate(ids, attention_mask=mask, noise_sampler=replay(table, [0, 1]), **kwargs)
    right = model.generate(right_ids, attention_mask=right_mask, noise_sampler=replay(table, [0, 1]), **kwargs)
    assert torch.equal(left[:, 7:], right[:, 7:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_static_cache_gives_the_dynamic_caches_tokens(model, temperature, device):
    """cache_implementation="static" (fixed shapes for a compiled backbone): the same tokens as the default cache, for
    padded batches (the static cache takes the chunk mask of all its slots) and for unpadded prompts."""
    model = on_device(model, device)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    table = noise_table(len(prompts), 6, pool=1 if temperature == 1.0 else 16)
    kwargs = dict(max_new_tokens=22, temperature=temperature, num_samples=16, eos_token_id=None)
    for ids, mask in (left_pad(prompts), (torch.tensor([prompts[0][:8]] * 3), None)):
        ids, mask = ids.to(device), mask if mask is None else mask.to(device)
        outputs = [
            model.generate(
                ids,
                attention_mask=mask,
                noise_sampler=replay(table, [0, 1, 2]),
                generator=torch.Generator(device).manual_seed(0),  # the pool's pick
                **kwargs,
                **cache,
            )
            for cache in ({}, {"cache_implementation": "static"})
        ]
        assert outputs[0].shape == (3, ids.shape[1] + 22)
        assert torch.equal(outputs[0], outputs[1])


def test_static_cache_holds_the_whole_generation(model, monkeypatch):
    """The static cache is made once, with a slot per chunk the backbone reads (the prompt's, and every new chunk but
    the last), and every step writes the next slots: a cache one slot short fails, so a miscount cannot pass."""
    import calm_transformers.generation_calm as generation

    static_cache, made = generation.StaticCache, []

    def counted(config, max_cache_len, short=0):
        made.append(max_cache_len)
        return static_cache(config=config, max_cache_len=max_cache_len - short)

    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])  # 2 chunks; 13 new tokens: 4 more, the backbone reads 3 of them
    monkeypatch.setattr(generation, "StaticCache", counted)
    out = model.generate(prompt, max_new_tokens=13, eos_token_id=None, cache_implementation="static")
    assert out.shape == (1, 19) and made == [5]
    monkeypatch.setattr(generation, "StaticCache", lambda config, max_cache_len: counted(config, max_cache_len, 1))
    with pytest.raises((IndexError, RuntimeError)):  # the backbone's own error: a slot past the cache's end
        model.generate(prompt, max_new_tokens=13, eos_token_id=None, cache_implementation="static")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_backbone_compiles_once_with_a_static_cache(monkeypatch, device):
    """The README's recipe, `model.transformer.compile()` + cache_implementation="static": the same tokens as eager,
    and every step after the first runs the decode graph compiled for it (any recompilation fails: a guard on a value
    that changes per step, such as a growing mask, would recompile every step)."""
    require_torch_compile()
    model = tiny_model(patch_size=4).to(device)
    ids, mask = (t.to(device) for t in left_pad([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]))  # padding: a chunk mask
    kwargs = dict(attention_mask=mask, max_new_tokens=20, temperature=1.0, eos_token_id=None)
    kwargs.update(cache_implementation="static")
    eager = model.generate(ids, generator=torch.Generator(device).manual_seed(0), **kwargs)
    backbone, calls = model.backbone, []

    def strict(*args, **kw):  # the prefill and the first step compile; from the second step on nothing may
        calls.append(len(calls))
        if len(calls) == 3:
            torch.compiler.set_stance("fail_on_recompile")
        return backbone(*args, **kw)

    model.transformer.compile()
    monkeypatch.setattr(model, "backbone", strict)
    try:
        compiled = model.generate(ids, generator=torch.Generator(device).manual_seed(0), **kwargs)
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
    assert len(calls) == 5 and torch.equal(compiled, eager)


def test_align_prompts_layouts():
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, PAD, PAD, PAD]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    aligned, token_mask = align_prompts(ids, mask, 4, PAD, "left")
    assert aligned.tolist() == [[PAD, 5, 6, 7], [PAD, PAD, 8, 9]]
    assert token_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    ref, ref_mask = align_prompts(torch.tensor([[5, 6, 7, 8, 9]]), torch.ones(1, 5), 4, PAD, "reference")
    assert ref.tolist() == [[5, 6, 7, 8, 9, PAD, PAD, PAD]] and bool(ref_mask.all())
    with pytest.raises(ValueError, match="equal length"):
        align_prompts(ids, mask, 4, PAD, "reference")


def test_reference_alignment_conditions_on_trailing_pad(model):
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kwargs = dict(max_new_tokens=4, do_sample=True, temperature=1.0, eos_token_id=None)
    table = noise_table(1, 2)
    ref = model.generate(prompt, prompt_alignment="reference", noise_sampler=replay(table, [0]), **kwargs)
    padded = torch.tensor([[5, 6, 7, 8, 9, 10, PAD, PAD]])
    explicit = model.generate(padded, noise_sampler=replay(table, [0]), **kwargs)
    assert ref[0, 6:].tolist() == explicit[0, 8:].tolist()


@pytest.mark.parametrize("max_new_tokens", [1, 3, 5, 9])
def test_max_new_tokens_is_exact(model, max_new_tokens):
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=max_new_tokens, eos_token_id=None)
    assert out.shape == (1, 3 + max_new_tokens)


def test_max_length(model):
    out = model.generate(torch.tensor([[5, 6, 7]]), max_length=10, eos_token_id=None)
    assert out.shape == (1, 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[5, 6, 7]]), max_length=3)


def first_chunk(model, prompt, table):
    return model.generate(
        prompt, max_new_tokens=4, do_sample=True, temperature=1.0, eos_token_id=None, noise_sampler=replay(table, [0])
    )[0, prompt.shape[1] :].tolist()


def test_eos_mid_chunk_stops_the_row(model):
    prompt = torch.tensor([[5, 6, 7, 8]])
    table = noise_table(1, 4)
    chunk = first_chunk(model, prompt, table)
    eos = chunk[1]  # declare the second token of the first chunk an end-of-sequence token
    out = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=True,
        temperature=1.0,
        eos_token_id=[eos, 93],
        pad_token_id=PAD,
        noise_sampler=replay(table, [0]),
    )
    new = out[0, 4:].tolist()
    assert new[:2] == chunk[:2]
    assert new[2:] == [PAD] * (len(new) - 2)
    assert len(new) == 4  # the loop stopped after the chunk that held the EOS


def test_eos_in_one_row_pads_it_while_others_continue(model):
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    table = noise_table(2, 4)
    free = model.generate(
        prompts,
        max_new_tokens=12,
        do_sample=True,
        temperature=1.0,
        eos_token_id=None,
        noise_sampler=replay(table, [0, 1]),
    )
    eos = free[0, 4].item()
    if eos in free[1, 4:].tolist():
        pytest.skip("random weights produced the chosen EOS in both rows")
    out = model.generate(
        prompts,
        max_new_tokens=12,
        do_sample=True,
        temperature=1.0,
        eos_token_id=eos,
        pad_token_id=PAD,
        noise_sampler=replay(table, [0, 1]),
    )
    assert out[0, 4] == eos and (out[0, 5:] == PAD).all()
    assert torch.equal(out[1], free[1])


def test_min_new_tokens_ignores_early_eos(model):
    prompt = torch.tensor([[5, 6, 7, 8]])
    table = noise_table(1, 4)
    eos = first_chunk(model, prompt, table)[0]
    out = model.generate(
        prompt,
        max_new_tokens=8,
        min_new_tokens=4,
        do_sample=True,
        temperature=1.0,
        eos_token_id=eos,
        noise_sampler=replay(table, [0]),
    )
    assert out.shape[1] > 5 and out[0, 4] == eos


def test_stopping_criteria_and_max_time(model):
    class AfterEight(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 12, dtype=torch.bool)

    out = model.generate(
        torch.tensor([[5, 6, 7, 8]]),
        max_new_tokens=40,
        eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([AfterEight()]),
    )
    assert out.shape == (1, 12)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=40, eos_token_id=None, max_time=0.0)
    assert out.shape == (1, 8)  # one chunk, then the time is up


def test_return_dict_and_generation_config(model):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=5, do_sample=False, num_samples=8, eos_token_id=None)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), generation_config=config, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 9)
    again = model.generate(inputs=torch.tensor([[5, 6, 7, 8]]), generation_config=config)
    assert out.sequences.shape == again.shape


def test_seeded_generation_is_reproducible(model):
    kwargs = dict(max_new_tokens=8, temperature=0.5, num_samples=16, eos_token_id=None)
    torch.manual_seed(3)
    a = model.generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    torch.manual_seed(3)
    b = model.generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    assert torch.equal(a, b)


def test_saved_generation_config_has_calm_defaults(tmp_path, model):
    model.save_pretrained(tmp_path)
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.temperature == 0.5 and saved.num_samples == 200 and saved.do_sample
    reloaded = type(model).from_pretrained(tmp_path)
    reloaded.generation_config.num_samples = 7
    reloaded.save_pretrained(tmp_path / "again")
    assert GenerationConfig.from_pretrained(tmp_path / "again").num_samples == 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=1.5), r"temperature must be in \(0, 1\]"),
        (dict(temperature=0.0), r"temperature must be in \(0, 1\]"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_beams=2), "num_beams"),
        (dict(prompt_alignment="middle"), "prompt_alignment"),
        (dict(shortlist_size=1), "shortlist_size must be 0"),
        (dict(shortlist_size=-3), "shortlist_size must be 0"),
        (dict(temperature_sampler="approximate"), "temperature_sampler must be 'pool'"),
        (dict(cache_implementation="offloaded"), "cache_implementation None or 'dynamic'"),
        (dict(foo=1), "foo"),
    ],
)
def test_bad_settings(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, **kwargs)


def test_token_logit_settings_warn_that_they_are_ignored(model):
    prompt = torch.tensor([[5, 6, 7, 8]])
    with pytest.warns(UserWarning, match=r"ignores top_p=0.9, repetition_penalty=1.2: these act on or return token"):
        model.generate(prompt, max_new_tokens=4, top_p=0.9, repetition_penalty=1.2)
    with pytest.warns(UserWarning, match=r"ignores output_scores=True"):
        model.generate(prompt, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    with warnings.catch_warnings():  # no warning for the defaults that transformers fills in, or values that do nothing
        warnings.simplefilter("error")
        model.generate(prompt, max_new_tokens=4)
        model.generate(prompt, max_new_tokens=4, top_k=50, top_p=1.0, repetition_penalty=1.0, output_scores=False)


@pytest.mark.parametrize("temperature", [0.5, 0.4, 0.7, 1 / 3])
def test_exact_temperature_sampling_draws_from_the_power_distribution(temperature):
    """Algorithm 1 against a black-box sampler with known P: the chunks follow P^(1/T) / Z (for non-reciprocal T
    too, where stage 2 matters), not P or the stage-1 power alone."""
    from calm_transformers.generation_calm import exact_temperature_sampling

    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    chunks = torch.tensor([[1, 1, 1], [1, 2, 1], [2, 1, 1], [1, 1, 2]])
    generator = torch.Generator().manual_seed(0)

    def draw(m):
        return chunks[torch.multinomial(p, m, replacement=True, generator=generator)]

    picked = torch.stack(
        [exact_temperature_sampling(draw, temperature, generator, draws_per_call=16) for _ in range(6000)]
    )
    empirical = (picked.unsqueeze(1) == chunks).all(-1).float().mean(0)  # [4]
    target = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    stage_one = p ** int(1 / temperature + 1e-6) / (p ** int(1 / temperature + 1e-6)).sum()
    assert (empirical - target).abs().sum() / 2 < 0.025
    assert (empirical - p).abs().sum() / 2 > 0.07
    if temperature in (0.4, 0.7):  # 1/T not an integer: stage 1 alone would draw from P^n
        assert (empirical - stage_one).abs().sum() / 2 > 0.04


def test_exact_temperature_sampling_gives_up_with_a_clear_error():
    from calm_transformers.generation_calm import exact_temperature_sampling

    def draw(m):  # a flat distribution over 10^6 chunks: two equal draws are rare
        return torch.randint(0, 10**6, (m, 1))

    with pytest.raises(RuntimeError, match=r"drew 256 chunks .* temperature_sampler='pool'"):
        exact_temperature_sampling(draw, 0.5, draws_per_call=64, max_draws=256)


def test_generate_with_the_exact_sampler():
    """temperature_sampler='exact' in generate: a head that ignores its noise puts all of P on one chunk per row
    (its hidden state's), so the exact and the pool sampler return the same chunks, row by row; seeded runs repeat."""
    model = tiny_model(vocab_size=500)
    with torch.no_grad():
        model.generative_head.noise_embd.weight.zero_()
    prompt = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    settings = dict(max_new_tokens=12, temperature=0.4, num_samples=16, eos_token_id=None)
    exact = model.generate(prompt, temperature_sampler="exact", generator=torch.Generator().manual_seed(3), **settings)
    pool = model.generate(prompt, generator=torch.Generator().manual_seed(3), **settings)
    assert exact.shape == (2, 5 + 12) and not torch.equal(exact[0, 5:], exact[1, 5:])
    assert torch.equal(exact, pool)
    again = model.generate(prompt, temperature_sampler="exact", generator=torch.Generator().manual_seed(3), **settings)
    assert torch.equal(again, exact)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        model.generate(torch.tensor([5, 6, 7, 8]), max_new_tokens=4)
    with pytest.raises(ValueError, match="out of range"):
        model.generate(torch.tensor([[5, 600]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.tensor([[5] * 200]), max_new_tokens=100)
    with pytest.raises(ValueError, match="all zeros"):
        model.generate(torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="needs input_ids"):
        model.generate(max_new_tokens=4)


def test_inputs_on_another_device_name_what_to_move(model):
    """The prompt, its mask and the generator must be on the model's device (on a GPU machine: CPU tensors or a CPU
    generator); the error names the argument and the fix. "meta" stands in for the other device here."""
    from types import SimpleNamespace

    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match=r"input_ids are on meta but the model is on cpu: pass input_ids.to\(model"):
        model.generate(ids.to("meta"), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask is on meta, input_ids on cpu"):
        model.generate(ids, attention_mask=torch.ones_like(ids, device="meta"), max_new_tokens=4)
    cuda_generator = SimpleNamespace(device=torch.device("cuda", 0))  # what a torch.Generator("cuda") reports
    with pytest.raises(ValueError, match=r"a cuda generator .* torch.Generator\(device=model.device\)"):
        model.generate(ids, generator=cuda_generator, max_new_tokens=4)


# --- the temperature sampler against a black box with a known distribution ---------------------------------------

CHUNKS = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]])
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.10])


def sharpened(temperature: float) -> torch.Tensor:
    p = PROBS ** (1 / temperature)
    return p / p.sum()


def empirical(temperature: float, pool: int, trials: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(PROBS.expand(trials, -1), pool, replacement=True, generator=g)  # [trials, N]
    candidates = CHUNKS[draws]  # [trials, N, 2]
    picked = temperature_sampling(candidates, temperature, generator=g)
    chosen = draws[torch.arange(trials), picked]
    return torch.bincount(chosen, minlength=4).float() / trials


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.4])
def test_temperature_sampler_approaches_sharpened_distribution(temperature):
    target = sharpened(temperature)
    errors = [(empirical(temperature, pool) - target).abs().max().item() for pool in (4, 32, 256)]
    assert errors[-1] < 0.03, errors  # consistent: close at large N (4000 trials: ~0.008 std)
    assert errors[-1] < errors[0], errors  # and closer than with a tiny pool


def test_temperature_one_pool_is_unbiased():
    assert (empirical(1.0, 16) - PROBS).abs().max() < 0.03


def test_greedy_pool_picks_most_frequent_first_seen():
    candidates = torch.tensor([[[1, 1], [2, 2], [2, 2], [1, 1], [3, 3]]])
    assert temperature_sampling(candidates, 0.5, do_sample=False).item() == 0  # tie 2 vs 2: first seen wins
    candidates = torch.tensor([[[1, 1], [2, 2], [2, 2], [3, 3]]])
    assert temperature_sampling(candidates, 1.0, do_sample=False).item() == 1


def test_integer_reciprocal_weights_match_binomial():
    """T = 1/2: one chunk seen 3 times, one twice, one once -> weights C(3,2)=3, C(2,2)=1, 0."""
    candidates = torch.tensor([[[1], [1], [1], [2], [2], [3]]]).expand(20000, -1, -1)
    picked = temperature_sampling(candidates, 0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(candidates[torch.arange(20000), picked, 0], minlength=4).float() / 20000
    assert abs(freq[1].item() - 0.75) < 0.015 and abs(freq[2].item() - 0.25) < 0.015 and freq[3] == 0
    # No chunk reaches 3 copies at T = 1/3: fall back to m = 2, then m = 1 (uniform over unique chunks).
    candidates = torch.tensor([[[1], [2], [3], [4]]]).expand(20000, -1, -1)
    picked = temperature_sampling(candidates, 1 / 3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(candidates[torch.arange(20000), picked, 0], minlength=5).float() / 20000
    assert torch.allclose(freq[1:], torch.full((4,), 0.25), atol=0.015)
    assert math.isclose(freq.sum().item(), 1.0)


def test_bfloat16_generation(tmp_path, model):
    """The bf16 path that runs on GPU, exercised on CPU: the pool is decoded and counted in bf16."""
    model.save_pretrained(tmp_path)
    bf16 = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto").eval()
    assert bf16.dtype == torch.bfloat16
    torch.manual_seed(0)
    prompt = torch.tensor([[5, 6, 7, 8, 9]], device=bf16.device)  # device_map="auto": a GPU where there is one
    out = bf16.generate(prompt, max_new_tokens=9, temperature=0.5, num_samples=32, eos_token_id=None)
    assert out.shape == (1, 14) and out.dtype == torch.long


# --- the fast candidate decode is exact ----------------------------------------------------------------------------


def test_identical_chunks_matches_full_decode():
    from calm_transformers.generation_calm import identical_chunks, plain_argmax

    torch.manual_seed(0)
    weight = torch.randn(7, 5)  # a 7-token vocabulary: many shared prefixes and duplicate chunks

    def argmax_tokens(states):
        return torch.nn.functional.linear(states, weight).argmax(-1)

    projected = []

    def counting(states):
        projected.append(states.shape[0])
        return argmax_tokens(states)

    states = torch.randn(3, 40, 4, 5)
    states[:, 5:10] = states[:, :1]  # exact duplicates
    tokens = argmax_tokens(states)  # [3, 40, 4]
    expected = (tokens.unsqueeze(2) == tokens.unsqueeze(1)).all(-1)
    decoded = []

    def token_states(chunk_states, positions):  # a "chunk state" here is its K token states side by side
        decoded.append(chunk_states.unflatten(-1, (4, 5))[:, positions])
        return decoded[-1]

    same, decoded_tokens = identical_chunks(
        states.flatten(-2), token_states, 4, lambda s, a: plain_argmax(s, a, counting)
    )
    assert torch.equal(same, expected)
    assert torch.equal(decoded_tokens[decoded_tokens >= 0], tokens[decoded_tokens >= 0])  # what it decoded is right
    assert bool((decoded_tokens[..., 0] >= 0).all())  # and every candidate's first token was decoded
    assert sum(projected) < 3 * 40 * 4  # it projected fewer states than the full decode
    assert len(decoded) == 2 and decoded[0].shape == (3 * 40, 1, 5)  # first tokens, then the later ones at once


def test_identical_chunks_decodes_the_likely_choice_in_the_first_pass():
    """`complete` names one candidate per row: its later tokens ride along with the pool's first tokens (same
    argmax call) when that call projects onto the whole vocabulary, and are left to `complete_chunks` when not."""
    from calm_transformers.generation_calm import certified_argmax, identical_chunks, plain_argmax

    torch.manual_seed(0)
    weight = torch.randn(400, 5)  # a large vocabulary: most candidates are unique after their first token
    states = torch.randn(2, 12, 4, 5)
    states[1, 3:5] = states[1, 2]  # candidates 2, 3 and 4 of row 1 are one chunk: decoded to the end anyway
    tokens = torch.nn.functional.linear(states, weight).argmax(-1)  # [2, 12, 4]
    calls = []

    def argmax_tokens(flat):
        calls.append(flat.shape[0])
        return torch.nn.functional.linear(flat, weight).argmax(-1)

    def token_states(chunk_states, positions):
        return chunk_states.unflatten(-1, (4, 5))[:, positions]

    complete = torch.tensor([7, 3])
    same, decoded = identical_chunks(
        states.flatten(-2), token_states, 4, lambda s, a, **k: plain_argmax(s, a, argmax_tokens, **k), complete
    )
    assert torch.equal(same, (tokens.unsqueeze(2) == tokens.unsqueeze(1)).all(-1))
    assert torch.equal(decoded[torch.arange(2), complete], tokens[torch.arange(2), complete])  # whole chunks
    assert calls[0] == 2 * 12 + 2 * 3  # first tokens and the two likely choices' later tokens: one pass

    # A shortlist that certifies every active state makes no full pass: optional states are then left undecoded.
    norm = float(weight.norm(dim=-1).max())
    pool = (3 * weight[11] + 0.001 * torch.randn(1, 6, 5)).clone()  # [1, 6, a]: five agreeing candidates
    pool[0, 5] = torch.randn(5)  # and one optional state elsewhere
    active = torch.tensor([[True] * 5 + [False]])
    calls.clear()
    found = certified_argmax(pool, active, weight, norm, argmax_tokens, 16, optional=~active)
    assert calls == [] and found[0].tolist() == [11] * 5 + [-1]
    pool[0, 4] = torch.randn(5)  # an active state the certificate cannot settle: the optional one comes along
    found = certified_argmax(pool, active, weight, norm, argmax_tokens, 16, optional=~active)
    assert calls == [2] and torch.equal(found, torch.nn.functional.linear(pool, weight).argmax(-1))


def test_sample_from_pool_inverts_the_weights_at_the_uniform_draw():
    """T = 1/2, chunks A x3, B x2, C x1: weights 3 : 1 : 0 on the first-seen copies of A and B."""
    from calm_transformers.generation_calm import sample_from_pool

    chunks = torch.tensor([0, 1, 0, 1, 2, 0])  # A B A B C A
    same = (chunks[:, None] == chunks[None, :]).expand(5, -1, -1)
    uniform = torch.tensor([0.0, 0.5, 0.7499, 0.75, 1 - 2.0**-53], dtype=torch.float64)
    assert sample_from_pool(same, 0.5, uniform=uniform).tolist() == [0, 0, 0, 1, 1]  # never C (weight 0)
    unique = torch.eye(8, dtype=torch.bool).expand(3, -1, -1)  # all unique: uniform over the 8 candidates
    uniform = torch.tensor([0.0, 0.51, 0.99], dtype=torch.float64)
    assert sample_from_pool(unique, 0.5, uniform=uniform).tolist() == [0, 4, 7]
    # floor(u N): what `_next_chunk` expects the pick of an all-unique pool to be, before decoding the pool
    for size, draws in ((7, 5000), (200, 500)):
        uniform = torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        unique = torch.eye(size, dtype=torch.bool).expand(len(uniform), -1, -1)
        assert torch.equal(sample_from_pool(unique, 0.5, uniform=uniform), (uniform * size).long())


def test_next_chunk_decodes_the_chosen_unique_chunk_in_the_pool_pass(monkeypatch):
    """Diverse candidates: the choice is the one drawn for an all-unique pool, decoded in the same pass as the
    pool's first tokens, so a T = 0.5 step projects onto the vocabulary once."""
    model = tiny_model(vocab_size=500)
    with torch.no_grad():
        model.ae_model.encoder.embed_tokens.weight.normal_()
    torch.manual_seed(0)
    hidden = torch.randn(2, model.config.hidden_size)
    noise = torch.rand(2, 6, model.config.noise_size) - 0.5
    with torch.no_grad():
        latents = model.generative_head.sample(hidden.unsqueeze(1).expand(2, 6, -1), noise)
        candidates = model.ae_model.decode_tokens(latents.unsqueeze(2))  # [2, 6, K]
    first = candidates[..., 0]
    assert bool(((first.unsqueeze(2) == first.unsqueeze(1)).sum(-1) == 1).all())  # the premise: all unique
    calls = []
    argmax_tokens = model.ae_model.argmax_tokens
    monkeypatch.setattr(model.ae_model, "argmax_tokens", lambda s: calls.append(s.shape[0]) or argmax_tokens(s))
    for seed in range(4):
        calls.clear()
        chunk = model._next_chunk(
            hidden, 6, 0.5, True, torch.Generator().manual_seed(seed), lambda shape, device, dtype: noise
        )
        choice = temperature_sampling(candidates, 0.5, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(chunk, candidates[torch.arange(2), choice])
        assert calls == [2 * 6 + 2 * (model.config.patch_size - 1)]


def test_token_states_are_the_decoders_states():
    """`chunk_state` + `token_states(positions)`, the token-at-a-time decode of candidate pools, is the decoder's
    forward pass, on any subset of rows and positions."""
    decoder = tiny_model().ae_model.decoder
    latents = torch.randn(6, 2, decoder.latent_to_hidden.in_features)  # [B, P, l]
    with torch.no_grad():
        states = decoder(latents).unflatten(1, (2, decoder.patch_size))  # [B, P, K, a]
        chunk = decoder.chunk_state(latents)  # [B, P, a]
        assert torch.equal(decoder.token_states(chunk), states)
        for positions in (slice(0, 1), slice(1, None), slice(2, 3)):
            torch.testing.assert_close(decoder.token_states(chunk, positions), states[:, :, positions])
            torch.testing.assert_close(decoder.token_states(chunk[1::2], positions), states[1::2, :, positions])


def test_complete_chunks_decodes_only_the_missing_tokens_in_one_call():
    from calm_transformers.generation_calm import complete_chunks

    weight = torch.randn(11, 5)
    chunk_states = torch.randn(3, 4 * 5)  # [B, K*a]: a chunk state here is its token states side by side

    def token_states(chunks, positions):
        return chunks.unflatten(-1, (4, 5))[:, positions]

    calls = []

    def argmax_tokens(states):
        calls.append(states.shape[0])
        return torch.nn.functional.linear(states, weight).argmax(-1)

    full = argmax_tokens(chunk_states.unflatten(-1, (4, 5)))  # [B, K]
    calls.clear()
    partial = full.clone()
    partial[0, 1:] = -1  # unique after its first token
    partial[2, 3:] = -1
    assert torch.equal(complete_chunks(partial, chunk_states, token_states, argmax_tokens), full)
    assert calls == [4]  # the 3 + 1 missing tokens, together
    assert torch.equal(complete_chunks(full, chunk_states, token_states, argmax_tokens), full) and calls == [4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [3, 64, 65, 700])
def test_argmax_tokens_equals_full_logits_argmax(dtype, num_rows, device):
    """Blocked over rows and vocabulary: the argmax of the full logits, the first maximum on ties."""
    ae = tiny_model().ae_model.to(device, dtype)
    weight = ae.encoder.embed_tokens.weight
    with torch.no_grad():
        weight[40] = weight[7]  # token 40 always ties with token 7: 7 must win
        weight[61] = weight[60]
    states = torch.randn(num_rows, weight.shape[1], dtype=dtype, device=device)
    states[: num_rows // 3] = weight[7] + 0.01 * states[: num_rows // 3]  # rows whose argmax is 7 (tied with 40)
    expected = torch.nn.functional.linear(states, weight).argmax(-1)
    assert bool((expected == 7).any())
    for blocks in ({}, {"vocab_block": 7, "rows_per_matmul": 5}, {"vocab_block": 40, "rows_per_matmul": 64}):
        assert torch.equal(ae.argmax_tokens(states, **blocks), expected), blocks
    copies = 2**20 // (num_rows * weight.shape[0]) + 1  # over 2^20 logits: blocks by default, 2048 rows at a time
    assert torch.equal(ae.argmax_tokens(states.repeat(copies, 1)), expected.repeat(copies))
    assert ae.argmax_tokens(states[:0]).shape == (0,)  # nothing to decode (a pool position with no candidate left)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_state_is_projected_by_mv(dtype, monkeypatch):
    """One state: `torch.mv` (a one-column matmul is slow on CPU in bf16), the logits and argmax of the batched
    product, the first maximum on ties; the certificate's probe goes the same way."""
    from calm_transformers.generation_calm import certified_argmax
    from calm_transformers.modeling_calm import vocab_logits

    ae = tiny_model().ae_model.to(dtype)
    weight = ae.encoder.embed_tokens.weight
    with torch.no_grad():
        weight[40] = weight[7]  # ties with token 7: 7 must win
    states = weight[7] + 0.01 * torch.randn(3, weight.shape[1], dtype=dtype)  # argmax 7
    calls = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *args: calls.append(args[0].shape) or mv(*args))
    batched = weight @ states.T  # [V, 3]
    torch.testing.assert_close(vocab_logits(weight, states[1:2]), batched[:, 1:2])
    assert calls == [weight.shape] and vocab_logits(weight, states).shape == batched.shape and len(calls) == 1
    assert ae.argmax_tokens(states[:1]).tolist() == [7] and len(calls) == 2
    norm = torch.linalg.vector_norm(weight.float(), dim=-1).max().item()
    active = torch.ones(1, 3, dtype=torch.bool)
    found = certified_argmax(states[None], active, weight, norm, ae.argmax_tokens, shortlist_size=8)
    assert found.tolist() == [[7, 7, 7]] and len(calls) == 3  # one probe


@pytest.mark.parametrize("run", [64, 5, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_first_maximum_on_signs_zeros_and_ties(dtype, run):
    """The running argmax reduces on the logits' bits as integers where that is exact (positive maxima) and on
    floats elsewhere: all-negative columns, a maximum of 0 reached first by -0, ties inside and across blocks and
    runs, blocks that end inside a run."""
    from calm_transformers.modeling_calm import bits_amax, keep_first_maximum

    nan = float("nan")
    blocks = [  # two vocabulary blocks of 3 tokens, one row per case
        [[-3.0, -1.0, -2.0], [-0.0, -1.0, 0.0], [1.0, 5.0, 5.0], [2.0, 1.0, 2.0], [-5.0, -4.0, -4.0], [7.0, 1.0, 2.0]],
        [[-1.0, -1.5, -0.5], [0.0, -2.0, 0.0], [5.0, 6.0, 6.0], [2.0, 1.5, 1.0], [-4.0, -9.0, -9.0], [nan, 1.0, 3.0]],
    ]
    logits = torch.tensor(blocks, dtype=dtype)  # [blocks, cases, 3]
    best_value = torch.full((6,), float("-inf"), dtype=dtype)
    best_index = torch.zeros(6, dtype=torch.long)
    for b in range(2):
        keep_first_maximum(best_value, best_index, torch.arange(6), logits[b].T, 3 * b, run)  # [3 tokens, 6 cases]
    full = torch.cat(list(logits), dim=-1)  # [cases, 6]
    assert best_index[:5].tolist() == full[:5].argmax(-1).tolist() == [5, 0, 4, 0, 1]
    assert best_index[5] == 0  # NaN logits are not a maximum: the case keeps its best number

    torch.manual_seed(0)  # mixed signs at random, across 5 blocks of 37 tokens; ties from a coarse grid
    scores = (torch.randn(300, 185) * 4).round().to(dtype) - torch.linspace(-3, 3, 300)[:, None].round().to(dtype)
    best_value = torch.full((300,), float("-inf"), dtype=dtype)
    best_index = torch.zeros(300, dtype=torch.long)
    for start in range(0, 185, 37):
        keep_first_maximum(best_value, best_index, torch.arange(300), scores[:, start : start + 37].T, start, run)
    assert torch.equal(best_index, scores.argmax(-1))
    assert torch.equal(best_value, scores.amax(-1))
    columns = torch.arange(0, 300, 7)  # a subset of the states: only theirs change
    best_value = torch.full((300,), float("-inf"), dtype=dtype)
    best_index = torch.full((300,), -1)
    keep_first_maximum(best_value, best_index, columns, scores[columns].T, 0, run)
    assert torch.equal(best_index[columns], scores[columns].argmax(-1))
    assert int((best_index >= 0).sum()) == len(columns)
    for dim in (0, 1):
        assert torch.equal(bits_amax(scores, dim), scores.amax(dim))
        assert torch.equal(bits_amax(scores.abs() + 1, dim), (scores.abs() + 1).amax(dim))  # all positive: on bits


def _pool_states(agree: bool, dtype=torch.float32, rows: int = 3, candidates: int = 50):
    """Decoder states of candidate pools: near copies of one state per row (a confident trained model), or diverse."""
    ae = tiny_model(vocab_size=500).ae_model
    with torch.no_grad():
        ae.encoder.embed_tokens.weight.normal_()  # trained embeddings are far from the 0.02-std initialisation
    ae = ae.to(dtype)
    weight = ae.encoder.embed_tokens.weight
    base = 3 * weight[torch.tensor([11, 250, 499])][:rows, None]  # [R, 1, a]: a clear favourite token per row
    spread = 0.02 if agree else 3.0
    states = (base + spread * torch.randn(rows, candidates, weight.shape[1])).to(dtype)
    return ae, weight, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agree", [True, False])
def test_certified_argmax_equals_plain(agree, dtype):
    from calm_transformers.generation_calm import certified_argmax, plain_argmax

    torch.manual_seed(0)
    ae, weight, states = _pool_states(agree, dtype)
    active = torch.rand(states.shape[:2]) < 0.8
    active[2] = False  # a row with nothing to decode
    projected = []

    def counting(x):
        projected.append(x.shape[0])
        return ae.argmax_tokens(x)

    norm = torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).max().item()
    tokens = certified_argmax(states, active, weight, norm, counting, shortlist_size=16)
    assert torch.equal(tokens, plain_argmax(states, active, ae.argmax_tokens))
    assert bool((tokens[~active] == -1).all())
    if agree:
        assert sum(projected) == 0  # every candidate certified from the shortlist
    else:
        assert sum(projected) > 0.5 * int(active.sum())  # the certificate fails and falls back


def test_certified_argmax_ties_and_whole_vocabulary_shortlist():
    from calm_transformers.generation_calm import certified_argmax, plain_argmax

    ae, weight, states = _pool_states(True)
    with torch.no_grad():
        weight[12] = weight[11]  # row 0's favourite has an exact twin with a higher id
    norm = torch.linalg.vector_norm(weight, dim=-1).max().item()
    active = torch.ones(states.shape[:2], dtype=torch.bool)
    plain = plain_argmax(states, active, ae.argmax_tokens)
    assert bool((plain[0] == 11).all())
    for size in (16, 500, 10_000):  # the shortlist may cover the whole vocabulary
        assert torch.equal(certified_argmax(states, active, weight, norm, ae.argmax_tokens, size), plain)


def test_shortlist_argmax_backs_off_when_it_does_not_pay():
    from calm_transformers.generation_calm import ShortlistArgmax

    ae, _, diverse = _pool_states(False)
    _, _, agreeing = _pool_states(True)
    active = torch.ones(diverse.shape[:2], dtype=torch.bool)
    decode = ShortlistArgmax(ae, shortlist_size=16, backoff=2)
    decode(agreeing, active)
    assert decode.certified == decode.requested == active.numel() and decode.skip == 0
    decode(diverse, active)  # fails the certificate: the next two calls project in full
    assert decode.skip == 2 and decode.certified < decode.requested
    requested = decode.requested
    decode(agreeing, active), decode(agreeing, active)
    assert decode.requested == requested and decode.skip == 0
    decode(agreeing, active)
    assert decode.requested == requested + active.numel()
    for skip in (2, 4, 8):  # failures in a row double the back-off
        decode(diverse, active)
        assert decode.skip == skip
        for _ in range(skip):
            decode(agreeing, active)
        assert decode.skip == 0
    decode(agreeing, active)  # a call that pays resets it
    decode(diverse, active)
    assert decode.skip == 2


def test_shortlist_argmax_projects_few_states_in_full():
    """At most min_states active states: projected in full without a probe (as costly as projecting them), same
    tokens; more: the shortlist is tried."""
    ae, _, agreeing = _pool_states(True)
    decode = ShortlistArgmax(ae, shortlist_size=16, min_states=20)
    few = torch.zeros(agreeing.shape[:2], dtype=torch.bool)
    few[0, :12], few[2, :8] = True, True  # 20 states
    expected = plain_argmax(agreeing, few, ae.argmax_tokens)
    assert torch.equal(decode(agreeing, few), expected)
    assert decode.requested == decode.certified == 0 and decode.skip == 0
    few[1, 0] = True  # 21 states
    assert torch.equal(decode(agreeing, few), plain_argmax(agreeing, few, ae.argmax_tokens))
    assert decode.requested == decode.certified == 21


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,do_sample", [(0.5, True), (1 / 3, True), (0.4, True), (0.5, False)])
def test_fast_pool_decode_equals_plain_path(model, temperature, do_sample, device):
    """Same draws, same tokens: the prefix-group decode against decoding every candidate in full."""
    model = on_device(model, device)
    hidden = torch.randn(3, model.config.hidden_size).to(device)
    noise = (torch.rand(3, 64, model.config.noise_size) - 0.5).to(device)
    fast = model._next_chunk(
        hidden, 64, temperature, do_sample, torch.Generator(device).manual_seed(5), lambda shape, device, dtype: noise
    )
    with torch.no_grad():
        latents = model.generative_head.sample(hidden.unsqueeze(1).expand(3, 64, -1), noise)
        candidates = model.ae_model.decode_tokens(latents.unsqueeze(2))  # [3, 64, K]
    choice = temperature_sampling(candidates, temperature, do_sample, torch.Generator(device).manual_seed(5))
    assert torch.equal(fast, candidates[torch.arange(3, device=device), choice])
    shortlist = model._next_chunk(
        hidden,
        64,
        temperature,
        do_sample,
        torch.Generator(device).manual_seed(5),
        lambda shape, device, dtype: noise,
        ShortlistArgmax(model.ae_model, shortlist_size=8),
    )
    assert torch.equal(shortlist, fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agree", [True, False])
def test_generate_with_and_without_shortlist(agree, monkeypatch, device):
    """The default shortlist decode against shortlist_size=0 (every pool projected in full): same seed, same
    tokens, on a model whose candidates agree (a confident head) and on one whose candidates are diverse."""
    from calm_transformers import generation_calm

    decoders = []
    monkeypatch.setattr(
        generation_calm, "ShortlistArgmax", lambda *a, **k: decoders.append(ShortlistArgmax(*a, **k)) or decoders[-1]
    )
    model = tiny_model(vocab_size=500)
    with torch.no_grad():
        model.ae_model.encoder.embed_tokens.weight.normal_()
        if agree:  # the head's sample barely depends on its noise: near copies of one latent per step
            model.generative_head.final_layer.linears[-1].weight.mul_(0.01)
            model.generative_head.final_layer.linears[-1].bias.normal_(0, 3)
    model, prompt = model.to(device), torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], device=device)
    outputs = [
        model.generate(
            prompt,
            max_new_tokens=24,
            temperature=0.5,
            num_samples=32,
            eos_token_id=None,
            shortlist_size=size,
            generator=torch.Generator(device).manual_seed(1),
        )
        for size in (0, 8, 64)
    ]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert len(decoders) == 2  # shortlist_size=0 projects in full
    for decoder in decoders:
        if agree:
            assert decoder.certified == decoder.requested > 0
        else:
            assert decoder.certified < 0.2 * decoder.requested


def test_cached_projection_values_follow_weight_changes():
    """max_v |w_v| and the bf16 screen of a float32 model (each a read of the whole weight, cached) are recomputed
    when the weight changes in place: stale copies would give wrong bounds and wrong tokens."""
    ae, weight, states = _pool_states(False)
    first = ae.max_row_norm()
    assert first == pytest.approx(weight.norm(dim=-1).max().item())
    flat = states.reshape(-1, states.shape[-1])
    assert torch.equal(ae.argmax_tokens(flat), flat.matmul(weight.T).argmax(-1))
    with torch.no_grad():
        weight[3] *= 10
        weight[7] = -weight[7]
    assert ae.max_row_norm() == pytest.approx(weight.norm(dim=-1).max().item()) != first
    assert torch.equal(ae.argmax_tokens(flat), flat.matmul(weight.T).argmax(-1))
    if "bf16_weight" in ae.__dict__.get("_projection_cache", {}):  # the screen ran (a CPU with bf16 units)
        assert torch.equal(ae._cached("bf16_weight", None), weight.to(torch.bfloat16))
    assert "_projection_cache" in ae.__dict__
    ae.to(torch.float64)  # moving or casting the model drops the copies (the bf16 screen: 131 MB at CALM-M shapes)
    assert "_projection_cache" not in ae.__dict__
    assert ae.max_row_norm() == pytest.approx(ae.encoder.embed_tokens.weight.norm(dim=-1).max().item())


@pytest.mark.parametrize("num_rows", [1, 5, 64, 300])
def test_screened_argmax_equals_float32_argmax(num_rows):
    """The bf16 screen with float32 rescoring gives the float32 argmax: on exact ties (the lower id wins), where
    bf16 cannot tell the best tokens apart, and where bf16 ranks the two best tokens the wrong way round (the
    float32 winner's block is then not the block of the best bf16 score: only the error bound keeps it)."""
    from calm_transformers.modeling_calm import screened_argmax

    torch.manual_seed(num_rows)
    weight = torch.nn.functional.normalize(torch.randn(500, 16), dim=-1).bfloat16().float()  # bf16-exact rows
    weight[300] = weight[20]  # an exact tie across blocks: 20 must win
    weight[450] = weight[77] * (1 + 2**-12)  # the same row in bf16, but it scores higher in float32
    weight[140] = weight[77] * (1 - 2**-12)
    states = torch.randn(num_rows, 16)
    states[::3] = 4 * weight[77] + 0.01 * states[::3]  # float32 argmax 450; bf16 alone would say 77
    states[1::3] = 4 * weight[20] + 0.01 * states[1::3]  # argmax 20, tied with 300

    # Rows 10 and 480 near row 5, such that for the state 4 * row 5, float32 prefers 480 and bf16 prefers 10.
    probe = 4 * weight[5]
    for _ in range(10000):
        rival, winner = weight[5] + 2e-3 * torch.randn(2, 16)
        exact = torch.stack([rival, winner]) @ probe
        approx = (torch.stack([rival, winner]).bfloat16() @ probe.bfloat16()).float()
        if exact[1] > exact[0] and approx[0] > approx[1]:
            break
    else:
        raise AssertionError("no pair that bf16 ranks the wrong way round")
    weight[10], weight[480], weight[5] = rival, winner, -weight[5]
    states[2::3] = probe

    expected = (states @ weight.T).argmax(-1)
    assert bool((expected[2::3] == 480).all())
    max_row_norm = weight.norm(dim=-1).max().item()
    for vocab_block in (7, 64, 1024):
        for rows_per_matmul in (3, 512):
            tokens = screened_argmax(
                states, weight, weight.to(torch.bfloat16), max_row_norm, vocab_block, rows_per_matmul
            )
            assert torch.equal(tokens, expected), (vocab_block, rows_per_matmul)
    bf16_only = (states.bfloat16() @ weight.bfloat16().T).float().argmax(-1)
    assert not torch.equal(bf16_only, expected)  # the case needs the float32 rescoring


def test_argmax_tokens_routes_float32_through_the_screen(monkeypatch):
    from calm_transformers import modeling_calm

    ae, weight, states = _pool_states(False)
    flat = states.reshape(-1, states.shape[-1])  # 150 rows: a pool
    calls = []
    screened = modeling_calm.screened_argmax
    monkeypatch.setattr(modeling_calm, "screened_argmax", lambda *a, **k: calls.append(1) or screened(*a, **k))
    monkeypatch.setattr(modeling_calm, "cpu_has_fast_bf16", lambda: True)
    assert torch.equal(ae.argmax_tokens(flat), flat.matmul(weight.T).argmax(-1)) and calls == []  # 500 tokens: small
    monkeypatch.setattr(modeling_calm, "SCREEN_MIN_VOCAB", 500)
    for fast in (True, False):
        monkeypatch.setattr(modeling_calm, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert torch.equal(ae.argmax_tokens(flat), flat.matmul(weight.T).argmax(-1))
    assert calls == [1]  # only where the CPU has bf16 units
    monkeypatch.setattr(modeling_calm, "cpu_has_fast_bf16", lambda: True)
    assert torch.equal(ae.argmax_tokens(flat[:64]), flat[:64].matmul(weight.T).argmax(-1)) and calls == [1]  # few rows
    assert torch.equal(
        ae.to(torch.bfloat16).argmax_tokens(flat.bfloat16()),
        modeling_calm.blocked_argmax(flat.bfloat16(), ae.encoder.embed_tokens.weight),
    ) and calls == [1]  # bf16 models: no screen
