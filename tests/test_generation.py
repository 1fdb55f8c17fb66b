"""generate(): chunked decoding through the standard interfaces, stopping, sampling and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from calm_transformers import CALMForCausalLM
from calm_transformers.generation_calm import align_prompts, temperature_sampling
from conftest import DEVICES, SHIPPED, on_device, require_torch_compile, tiny_model, tiny_tokenizer
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
    kwargs = dict(max_new_tokens=12, do_sample=False, num_candidates=12, eos_token_id=None)
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
    kwargs = dict(max_new_tokens=22, temperature=temperature, num_candidates=16, eos_token_id=None)
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
@pytest.mark.slow
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
    assert out[0, 4:].tolist() == chunk[:2]  # the text ends at the EOS, inside the first chunk, as transformers ends


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
    assert out.shape == (1, 5)  # time is up after the first token (checked after each token, as transformers does)


@pytest.fixture(scope="module")
def shipped():
    """The shipped model and its byte-level BPE tokenizer: stop strings are matched on the tokens' text."""
    from transformers import AutoTokenizer

    return CALMForCausalLM.from_pretrained(SHIPPED).eval(), AutoTokenizer.from_pretrained(SHIPPED)


@pytest.mark.parametrize("end", [2, 3, 4, 7])  # the stop ends inside the first chunk, on its last token, later
def test_stop_strings_end_the_text_exactly(shipped, end):
    """stop_strings (with tokenizer=, as transformers asks) stop a row at the token that completes the string, even
    inside a chunk of K tokens: the rest of the row is padding, and the text before it is the free run's."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    model, tokenizer = shipped
    prompt = tokenizer("My lord, the king", return_tensors="pt").input_ids
    start = prompt.shape[1]
    settings = dict(max_new_tokens=16, temperature=1.0, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    free = model.generate(prompt, generator=torch.Generator().manual_seed(0), **settings)
    # A stop string that spans two tokens: the last character of one and the whole text of the next (new token `end`).
    pieces = [tokenizer.decode(free[0, start + i : start + i + 1]) for i in (end - 2, end - 1)]
    stop = pieces[0][-1] + pieces[1]
    # Where transformers' own criterion, applied to the free run after each token, first fires.
    criterion = StopStringCriteria(tokenizer, [stop])
    first = next(n for n in range(start + 1, free.shape[1] + 1) if criterion(free[:, :n], None).item())
    out = model.generate(
        prompt, generator=torch.Generator().manual_seed(0), stop_strings=stop, tokenizer=tokenizer, **settings
    )
    assert torch.equal(out[0], free[0, :first])  # the text ends with the token that completes the stop string
    text = tokenizer.decode(out[0, start:first], clean_up_tokenization_spaces=False)  # the stop ends in its last token
    assert stop in text and stop not in tokenizer.decode(out[0, start : first - 1], clean_up_tokenization_spaces=False)


def test_stop_strings_need_the_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, stop_strings="w5")
    tokenizer = tiny_tokenizer()  # accepted, and not needed, without stop strings
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, tokenizer=tokenizer, eos_token_id=None)
    assert out.shape == (1, 8)


def test_custom_generate_runs_after_transformers_preparation(model):
    """custom_generate (transformers' extension point for decoding loops) is passed through: transformers prepares
    the inputs, the stopping criteria and the length budget, then calls it instead of CALM's loop."""
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    seen = {}

    def decoding_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.update(model=model, criteria=stopping_criteria, max_length=generation_config.max_length)
        return torch.cat([input_ids, input_ids[:, :1]], dim=-1)

    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, custom_generate=decoding_loop)
    assert out.tolist() == [[5, 6, 7, 8, 5]]
    assert seen["model"] is model and seen["max_length"] == 10
    assert any(isinstance(criterion, MaxLengthCriteria) for criterion in seen["criteria"])


def test_return_dict_and_generation_config(model):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=5, do_sample=False, num_candidates=8, eos_token_id=None)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), generation_config=config, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 9)
    again = model.generate(inputs=torch.tensor([[5, 6, 7, 8]]), generation_config=config)
    assert out.sequences.shape == again.shape


def test_seeded_generation_is_reproducible(model):
    kwargs = dict(max_new_tokens=8, temperature=0.5, num_candidates=16, eos_token_id=None)
    torch.manual_seed(3)
    a = model.generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    torch.manual_seed(3)
    b = model.generate(torch.tensor([[5, 6, 7, 8]]), **kwargs)
    assert torch.equal(a, b)


def test_saved_generation_config_has_calm_defaults(tmp_path, model):
    model.save_pretrained(tmp_path)
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.temperature == 0.5 and saved.num_candidates == 200 and saved.do_sample
    reloaded = type(model).from_pretrained(tmp_path)
    reloaded.generation_config.num_candidates = 7
    reloaded.save_pretrained(tmp_path / "again")
    assert GenerationConfig.from_pretrained(tmp_path / "again").num_candidates == 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=1.5), r"temperature must be in \(0, 1\]"),
        (dict(temperature=0.0), r"temperature must be in \(0, 1\]"),
        (dict(num_candidates=0), "num_candidates"),
        (dict(num_samples=8), "num_samples"),  # the energy loss's field of CALMConfig, not a generation setting
        (dict(num_beams=2), "num_beams"),
        (dict(prompt_alignment="middle"), "prompt_alignment"),
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
    settings = dict(max_new_tokens=12, temperature=0.4, num_candidates=16, eos_token_id=None)
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
    out = bf16.generate(prompt, max_new_tokens=9, temperature=0.5, num_candidates=32, eos_token_id=None)
    assert out.shape == (1, 14) and out.dtype == torch.long


# --- the pool decode is exact ----------------------------------------------------------------------------------


def test_identical_chunks_matches_full_decode():
    """Token by token, only shared prefixes decoded further: the same `same` matrix as decoding every candidate in
    full, with fewer states projected onto the vocabulary."""
    from calm_transformers.generation_calm import identical_chunks

    torch.manual_seed(0)
    weight = torch.randn(7, 5)  # a 7-token vocabulary: many shared prefixes and duplicate chunks
    projected = []

    def argmax_tokens(states):
        projected.append(states.shape[0])
        return torch.nn.functional.linear(states, weight).argmax(-1)

    states = torch.randn(3, 40, 4, 5)  # [B, N, K, a]
    states[:, 5:10] = states[:, :1]  # exact duplicates
    tokens = torch.nn.functional.linear(states, weight).argmax(-1)  # [3, 40, 4]
    same, decoded = identical_chunks(states, argmax_tokens)
    assert torch.equal(same, (tokens.unsqueeze(2) == tokens.unsqueeze(1)).all(-1))
    assert torch.equal(decoded[decoded >= 0], tokens[decoded >= 0])  # what it decoded is right
    assert bool((decoded[..., 0] >= 0).all())  # every candidate's first token is decoded
    assert projected[0] == 3 * 40 and sum(projected) < 3 * 40 * 4  # fewer states than the full decode
    one, first = identical_chunks(states[:, :1], argmax_tokens)  # a pool of one: its first token, nothing more
    assert bool(one.all()) and torch.equal(first[..., 0], tokens[:, :1, 0]) and bool((first[..., 1:] < 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,do_sample", [(0.5, True), (1 / 3, True), (0.4, True), (0.5, False)])
def test_pool_decode_equals_decoding_every_candidate(model, temperature, do_sample, device):
    """Same draws, same tokens: the pool path of a generation step against decoding all candidates in full and
    picking with `temperature_sampling` (the same generator seed)."""
    from transformers import GenerationConfig

    model = on_device(model, device)
    hidden = torch.randn(3, model.config.hidden_size).to(device)
    noise = (torch.rand(3, 64, model.config.noise_size) - 0.5).to(device)
    config = GenerationConfig(temperature=temperature, do_sample=do_sample)
    config.num_candidates, config.temperature_sampler = 64, "pool"
    with torch.no_grad():
        chunk = model._draw_chunk(
            hidden, config, torch.Generator(device).manual_seed(5), lambda shape, device, dtype: noise
        )
        latents = model.generative_head.sample(hidden.unsqueeze(1).expand(3, 64, -1), noise)
        candidates = model.ae_model.decode_tokens(latents.unsqueeze(2))  # [3, 64, K]
    choice = temperature_sampling(candidates, temperature, do_sample, torch.Generator(device).manual_seed(5))
    assert torch.equal(chunk, candidates[torch.arange(3, device=device), choice])


def test_sample_from_pool_weights_are_binomial_coefficients():
    """T = 1/2, chunks A x3, B x2, C x1: weights C(3, 2) = 3 : C(2, 2) = 1 : 0, on the first-seen copies."""
    from calm_transformers.generation_calm import sample_from_pool

    chunks = torch.tensor([0, 1, 0, 1, 2, 0])  # A B A B C A
    same = (chunks[:, None] == chunks[None, :]).expand(8000, -1, -1)
    picked = sample_from_pool(same, 0.5, generator=torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}  # first-seen copies only, never C
    assert abs((picked == 0).double().mean().item() - 0.75) < 0.02


def test_token_states_are_the_decoders_states():
    """`chunk_state` then `token_states`, as a generation step decodes its pool, is the decoder's forward pass."""
    decoder = tiny_model().ae_model.decoder
    latents = torch.randn(6, 2, decoder.latent_to_hidden.in_features)  # [B, P, l]
    with torch.no_grad():
        states = decoder(latents).unflatten(1, (2, decoder.patch_size))  # [B, P, K, a]
        assert torch.equal(decoder.token_states(decoder.chunk_state(latents)), states)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 65, 700])
def test_vocab_argmax_equals_full_logits_argmax(dtype, num_rows, device):
    """Blocked over the vocabulary: the argmax of the full logits, the first maximum on ties within and across
    blocks. Small integer weights and states make every logit exact whatever the kernel's summation order, so the
    comparison is exact and ties are common."""
    from calm_transformers.utils_calm import vocab_argmax

    ae = tiny_model().ae_model.to(device, dtype)
    weight = ae.encoder.embed_tokens.weight
    generator = torch.Generator().manual_seed(num_rows)
    with torch.no_grad():
        weight.copy_(torch.randint(-2, 3, weight.shape, generator=generator))
        weight[40] = weight[7]  # token 40 always ties with token 7 (another block for block sizes <= 40): 7 wins
        weight[61] = weight[60]  # a tie inside a block
    states = torch.randint(-2, 3, (num_rows, weight.shape[1]), generator=generator).to(device, dtype)
    states[: max(1, num_rows // 3)] = weight[7]  # argmax 7, tied with 40
    expected = torch.nn.functional.linear(states, weight).argmax(-1)
    assert bool((expected == 7).any())
    for block_size in (7, 40, 16384):
        assert torch.equal(vocab_argmax(states, weight, block_size), expected), block_size
    assert torch.equal(ae.argmax_tokens(states.unsqueeze(0)), expected.unsqueeze(0))  # any leading shape
    assert ae.argmax_tokens(states[:0]).shape == (0,)  # nothing to decode


def test_streamer_gets_one_token_per_put_and_output_ends_where_the_last_row_stops(model):
    """As transformers' generate: the streamer gets the prompt, then [B] per token; when every row has stopped, the
    output ends at the last row's stop, not at its chunk's end."""
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    table = noise_table(2, 4)
    settings = dict(max_new_tokens=12, do_sample=True, temperature=1.0, pad_token_id=PAD)
    free = model.generate(prompts, eos_token_id=None, noise_sampler=replay(table, [0, 1]), **settings)
    eos = [free[0, 5].item(), free[1, 6].item()]  # row 0 stops at its 2nd new token, row 1 at its 3rd (or earlier)

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.puts.append("end")

    streamer = Recorder()
    out = model.generate(prompts, eos_token_id=eos, noise_sampler=replay(table, [0, 1]), streamer=streamer, **settings)
    stop_rows = [next(i for i in range(12) if free[row, 4 + i].item() in eos) for row in range(2)]
    assert out.shape[1] == 4 + max(stop_rows) + 1 < 8
    assert streamer.puts[0].shape == (2, 4) and streamer.puts[-1] == "end"
    assert [tuple(put.shape) for put in streamer.puts[1:-1]] == [(2,)] * (out.shape[1] - 4)
    assert torch.equal(torch.stack(streamer.puts[1:-1], dim=1), out[:, 4:])


def test_greedy_ignores_the_temperature(model):
    """do_sample=False with temperature 0 (what an OpenAI temperature of 0 becomes) picks the most frequent chunk."""
    table = noise_table(1, 2, pool=8)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_candidates=8, eos_token_id=None)
    greedy = model.generate(torch.tensor([[5, 6, 7, 8]]), noise_sampler=replay(table, [0]), temperature=0.0, **kwargs)
    again = model.generate(torch.tensor([[5, 6, 7, 8]]), noise_sampler=replay(table, [0]), **kwargs)
    assert torch.equal(greedy, again)


def test_no_length_reminder_below_the_models_token_limit(model, caplog):
    """transformers' max-length criterion reminds when a text outgrows max_position_embeddings, read as tokens; a
    CALM's counts chunks (64 chunks: 256 tokens here), so 84 tokens get no reminder."""
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=80, eos_token_id=None)
    finally:
        logging.disable_propagation()
    assert out.shape == (1, 84) and "friendly reminder" not in caplog.text
