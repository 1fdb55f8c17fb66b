"""BrierLM (evaluate_calm.py): the fixture's estimate, convergence to exact Brier scores, perfect models, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from calm_transformers.evaluate_calm import (
    DEFAULT_DATA,
    brierlm,
    calm_brier_scores,
    evaluate_brierlm,
    load_documents,
    main,
    pack_documents,
)
from conftest import HANG_TIMEOUT, REPO, require_shared, tiny_model, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# Three short documents in the words of `tiny_tokenizer` (w3 ... w94), with repeats, as text has.
CORPUS = [
    "w5 w6 w7 w8 w5 w9 w10 w7 w8 w5 w11 w12",
    "w13 w14 w15 w16 w5 w17 w18 w5 w6 w19 w20 w21 w5 w14 w12",
    "w5 w9 w18 w5 w6 w22 w16 w5 w23 w8 w5 w7 w24 w25 w12",
]


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config).eval()


def assert_within_monte_carlo_error(estimate: list[float], exact: torch.Tensor, variance: torch.Tensor) -> None:
    """The estimates lie within 5 standard deviations of the Monte-Carlo collision term around the exact values."""
    tolerance = 5 * variance.sqrt() + 1e-6
    assert (torch.tensor(estimate, dtype=torch.float64) - exact).abs().le(tolerance).all(), (estimate, exact, tolerance)


# --- data --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """The tiny models' tokenizer (96 ids, BOS `<s>` = 1), saved."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_documents(tmp_path):
    lines = [json.dumps({"text": text, "id": i}) + "\n\n" for i, text in enumerate(CORPUS)]  # blank lines are skipped
    (tmp_path / "docs.jsonl").write_text("".join(lines))
    assert load_documents(tmp_path / "docs.jsonl") == CORPUS
    (tmp_path / "docs.json").write_text(json.dumps([{"body": t} for t in CORPUS]))
    assert load_documents(tmp_path / "docs.json", text_field="body") == CORPUS
    (tmp_path / "doc.txt").write_text(CORPUS[0])
    assert load_documents(tmp_path / "doc.txt") == [CORPUS[0]]
    with pytest.raises(ValueError, match="record 1 has no string field 'text'"):
        load_documents(tmp_path / "docs.json")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(tmp_path / "missing.jsonl")


def test_pack_documents(tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in CORPUS]
    stream = [token for doc in ids for token in [1, *doc]]  # BOS + text per document, no EOS
    blocks = pack_documents(tokenizer, CORPUS, block_size=8)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 8, 8)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # the incomplete tail is dropped
    assert pack_documents(tokenizer, CORPUS, block_size=8, add_bos=False).flatten().tolist()[:8] == ids[0][:8]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_documents(tokenizer, CORPUS[:1], block_size=1000)
    tokenizer.bos_token = None
    with pytest.raises(ValueError, match="no BOS token"):
        pack_documents(tokenizer, CORPUS, block_size=8)


def test_brierlm_is_the_geometric_mean_or_zero():
    assert brierlm([1.0, 1.0, 1.0, 1.0]) == 100
    assert brierlm([0.5, 0.4, 0.4, 0.4]) == pytest.approx(100 * (0.5 * 0.4**3) ** 0.25)
    assert brierlm([0.5, 0.4, -0.1, 0.4]) == 0
    # Four (or two) negative scores multiply to a positive product: BrierLM is still 0 ...
    assert brierlm([-0.95] * 4) == 0 and brierlm([-0.5, -0.5, 0.5, 0.5]) == 0 and brierlm([0.5, 0.5, 0.5, 0]) == 0
    # ... while the authors' training script clamps only the product (reachable, documented).
    assert brierlm([-0.95] * 4, clamp_product=True) == pytest.approx(95)
    assert brierlm([0.5, 0.4, -0.1, 0.4], clamp_product=True) == 0


# --- CALM estimator ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [1, 2, 3])
def test_brier_rollout_for_small_patches(patch_size):
    model = tiny_model(patch_size=patch_size)
    ids = torch.randint(0, 90, (2, 6 * patch_size))
    brier = calm_brier_scores(model, ids)
    assert brier.shape == (4,)
    assert torch.isfinite(brier).all()
    assert (brier >= -1).all() and (brier <= 1).all()


@pytest.mark.parametrize("patch_size, rows_per_pass", [(1, 5), (2, 3), (2, 256), (3, 4)])
def test_brier_rollout_equals_each_row_rolled_out_alone(patch_size, rows_per_pass):
    """The K < 4 roll-out runs every row side by side on its block's cache under a 4D mask. With a head whose sample
    is a function of its input, each row must give the chunks of that row rolled out alone from its own prefix:
    a row that saw a later chunk, another block or its neighbours' chunks, or a wrong position, differs."""
    from calm_transformers.evaluate_calm import _calm_rollout

    model = tiny_model(patch_size=patch_size, initializer_range=0.5)  # large weights: sharp, position-aware attention
    projection = torch.randn(model.config.hidden_size, model.config.latent_size)
    model.generative_head.sample = lambda hidden, noise=None, generator=None: 3 * hidden @ projection
    k, chunks = patch_size, 5
    ids = torch.randint(3, 90, (2, chunks * k), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :k] = 0  # a left-padded block: its positions start after the padding
    inputs, token_mask = ids[:, :-k], mask[:, :-k]
    valid = torch.ones(2, chunks - 1, dtype=torch.bool)
    valid[1, 0] = False
    first_samples = torch.randn(2, int(valid.sum()), model.config.latent_size)
    with torch.no_grad():
        tokens = _calm_rollout(model, first_samples, inputs, token_mask, valid, rows_per_pass=rows_per_pass)
        num_steps = -(-4 // k)
        assert tokens.shape == (2, int(valid.sum()), num_steps * k)
        rows = valid.nonzero().tolist()
        for sample in range(2):
            for row, (b, t) in enumerate(rows):
                prefix, prefix_mask = inputs[b : b + 1, : (t + 1) * k], token_mask[b : b + 1, : (t + 1) * k]
                chunk = model.ae_model.decode_tokens(first_samples[sample, row][None, None])  # [1, K]
                alone = [chunk]
                for _ in range(num_steps - 1):
                    ids_so_far = torch.cat([prefix, *alone], dim=1)
                    mask_so_far = torch.cat([prefix_mask, torch.ones_like(torch.cat(alone, dim=1))], dim=1)
                    hidden = model(ids_so_far, attention_mask=mask_so_far).last_hidden_state[:, -1:]
                    alone.append(model.ae_model.decode_tokens(model.generative_head.sample(hidden)))
                assert torch.equal(tokens[sample, row], torch.cat(alone, dim=1)[0]), (sample, b, t)


def test_brier_rollout_is_perfect_for_a_deterministic_copy_model():
    """A model whose every sample is the target gets Brier = 1 on every n-gram, also through the K < 4 roll-out."""
    model = tiny_model(patch_size=2)
    ids = torch.zeros((1, 12), dtype=torch.long)
    with torch.no_grad():
        model.ae_model.decoder.norm.weight.zero_()  # all logits 0: argmax decodes every latent to token 0
        assert torch.equal(calm_brier_scores(model, ids), torch.ones(4))
        ids[0, 6] = 5  # a wrong token at a chunk start lowers every n-gram that covers it
        worse = calm_brier_scores(model, ids)
    assert (worse < 1).all()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_calm_estimate_reproduces_reference(fixture_model, reference, monkeypatch, batch_size):
    """With the reference's two head samples per position, the estimate is the reference's `brier_expected`."""
    latents = iter(reference["brier_latents"].split(batch_size, dim=1))  # [2 samples, B, P-1 chunks, l] per batch

    def recorded_samples(hidden, noise=None, generator=None):
        return next(latents).flatten(1, 2)  # [2, n, l], positions row-major over (batch, chunk)

    monkeypatch.setattr(fixture_model.generative_head, "sample", recorded_samples)
    k = fixture_model.config.patch_size
    blocks = torch.cat([reference["input_ids"][:, :k], reference["brier_targets"]], dim=1)  # targets = chunks 1..P-1
    result = evaluate_brierlm(fixture_model, blocks, batch_size=batch_size, progress=False)
    torch.testing.assert_close(torch.tensor(result["brier"]), reference["brier_expected"], rtol=0, atol=1e-6)
    assert result["estimator"] == "calm" and result["num_positions"] == 10
    assert result["brierlm"] == pytest.approx(brierlm(reference["brier_expected"].tolist()))


@pytest.mark.parametrize("patch_size", [4, 2])
def test_calm_estimate_is_a_position_weighted_mean(patch_size):
    """A CALM that always samples token 0 scores +1 on an all-zero target n-gram and -1 on any other: the exact mean
    over the dataset, also when the batches hold different numbers of positions (3 blocks in batches of 2)."""
    model = tiny_model(patch_size=patch_size)
    with torch.no_grad():
        model.ae_model.decoder.norm.weight.zero_()  # all logits 0: every latent decodes to token 0
    generator = torch.Generator().manual_seed(0)
    nonzero = torch.rand(3, 6 * patch_size, generator=generator) < torch.tensor([[0.1], [0.3], [0.6]])
    blocks = nonzero.long() * 5

    expected = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(4, dtype=torch.long)
    length = blocks.shape[1]
    for block, start, n in itertools.product(blocks, range(patch_size, length, patch_size), range(1, 5)):
        if start + n <= length:  # the n-gram after this chunk start lies in the block
            expected[n - 1] += 1.0 if (block[start : start + n] == 0).all() else -1.0
            counts[n - 1] += 1
    result = evaluate_brierlm(model, blocks, batch_size=2, progress=False)
    torch.testing.assert_close(torch.tensor(result["brier"], dtype=torch.float64), expected / counts)
    assert result["num_positions_per_n"] == counts.tolist()

    perfect = evaluate_brierlm(model, torch.zeros_like(blocks), batch_size=2, progress=False)
    assert perfect["brier"] == [1.0, 1.0, 1.0, 1.0] and perfect["brierlm"] == 100


@pytest.mark.parametrize("patch_size", [4, 2])
def test_calm_estimate_on_a_random_model(patch_size):
    model = tiny_model(patch_size=patch_size).train()
    blocks = torch.randint(0, 90, (3, 6 * patch_size), generator=torch.Generator().manual_seed(0))
    rng_state = torch.get_rng_state()
    result = evaluate_brierlm(model, blocks, batch_size=2, seed=3, progress=False)
    assert model.training and torch.equal(torch.get_rng_state(), rng_state)  # a training loop is left as it was
    assert all(-1 <= b <= 1 for b in result["brier"]) and 0 <= result["brierlm"] <= 100
    assert result["num_positions"] == 3 * 5
    assert evaluate_brierlm(model, blocks, batch_size=2, seed=3, progress=False) == result
    with pytest.raises(ValueError, match=f"multiple of the model's patch_size={patch_size}"):
        evaluate_brierlm(model, blocks[:, :-1], progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        evaluate_brierlm(model, blocks + 90, progress=False)
    # K = 4: the 4-gram after chunk 1 needs 2 chunks; K = 2: after chunk 1, it needs 3.
    with pytest.raises(ValueError, match="too short to hold a single 4-gram target"):
        evaluate_brierlm(model, blocks[:, : (4 // patch_size) * patch_size], progress=False)


# --- discrete estimator ------------------------------------------------------------------------------------------


def test_discrete_estimate_converges_for_a_fixed_distribution():
    """Next token ~ p whatever the context: Brier-n = 2 prod_i p(y_i) - (sum_x p(x)^2)^n, exactly."""
    p = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    model = tiny_llama(vocab_size=4)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # the logits are 0 ...
    model.lm_head.register_forward_hook(lambda module, args, output: output + p.log().to(output.dtype))  # ... + log p
    generator = torch.Generator().manual_seed(0)
    blocks = torch.multinomial(p, 64 * 16, replacement=True, generator=generator).reshape(64, 16)

    collision = p.pow(2).sum()
    exact, variance = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for n in range(1, 5):
        windows = blocks[:, 1:].unfold(1, n, 1)  # the n tokens after each position with a complete n-gram
        exact[n - 1] = (2 * p[windows].prod(-1) - collision**n).mean()
        variance[n - 1] = collision**n * (1 - collision**n) / windows[..., 0].numel()

    result = evaluate_brierlm(model, blocks, batch_size=32, seed=0, progress=False, rollout_batch_size=200)
    assert result["estimator"] == "discrete" and result["num_positions_per_n"] == [64 * (16 - n) for n in range(1, 5)]
    assert_within_monte_carlo_error(result["brier"], exact, variance)
    assert evaluate_brierlm(model, blocks, batch_size=32, seed=0, progress=False, rollout_batch_size=200) == result
    assert evaluate_brierlm(model, blocks, batch_size=32, seed=1, progress=False)["brier"] != result["brier"]


def exact_brier(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Brier-1..4 averaged over the positions of `blocks`, by enumerating every continuation of every prefix,
    and the variance of the one-pass Monte-Carlo estimate (from its collision indicators)."""
    vocab_size, length = model.config.vocab_size, blocks.shape[1]
    sums, variance, counts = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    for block in blocks:
        # Position t's prefix followed by each of the V^depth continuations of depth = min(4, remaining tokens),
        # right-padded (causal attention: the padding changes no earlier logit) to run all positions at once.
        paths, sequences = [], []
        for t in range(length - 1):
            paths.append(torch.tensor(list(itertools.product(range(vocab_size), repeat=min(4, length - 1 - t)))))
            prefixed = torch.cat([block[: t + 1].expand(len(paths[t]), -1), paths[t]], dim=1)
            sequences.append(torch.nn.functional.pad(prefixed, (0, length + 3 - prefixed.shape[1])))
        with torch.no_grad():
            logits = model(torch.cat(sequences)).logits.double()
            true_logp = model(block[None]).logits[0, :-1].double().log_softmax(-1).gather(-1, block[1:, None])[:, 0]
        for t, (t_paths, t_logits) in enumerate(zip(paths, logits.split([len(p) for p in paths]), strict=True)):
            depth = t_paths.shape[1]
            logp = t_logits[:, t : t + depth].log_softmax(-1)
            path_logp = logp.gather(-1, t_paths[..., None])[..., 0].cumsum(-1)  # log P(first n tokens of the path)
            for n in range(1, depth + 1):
                # sum_x P(x)^2 over the n-grams; each n-gram heads V^(depth - n) of the enumerated paths.
                collision = (2 * path_logp[:, n - 1]).exp().sum() / vocab_size ** (depth - n)
                sums[n - 1] += 2 * true_logp[t : t + n].sum().exp() - collision
                variance[n - 1] += collision * (1 - collision)
                counts[n - 1] += 1
    return sums / counts, variance / counts**2


def context_dependent_model(family: str) -> torch.nn.Module:
    """Random weights large enough that the distributions depend strongly on the context and are peaked enough for
    frequent collisions up to 4-grams; Llama with a small rope_theta, so that relative positions matter too."""
    if family == "gpt2":  # absolute positions, tied embeddings
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=4,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=16,
            initializer_range=0.3,
            bos_token_id=1,
            eos_token_id=2,
        )
        return GPT2LMHeadModel(config).eval()
    model = tiny_llama(vocab_size=4, seed=1, initializer_range=0.3, rope_theta=10.0, attn_implementation=family[6:])
    assert model.config._attn_implementation == family[6:]
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    return model


@pytest.mark.parametrize("family", ["llama-sdpa", "llama-eager", "gpt2"])
def test_discrete_estimate_converges_to_the_exact_brier_scores(family):
    """Over many copies of 3 blocks, the estimate converges to the exact scores. This checks the roll-out's prefixes,
    masks and positions through the KV cache: for Llama, a row that reads another block's cache or later tokens of
    its block, or positions off by one, miss by more than 5 sigma."""
    model = context_dependent_model(family)
    # Blocks of different statistics, so that a roll-out row reading another block's cache is noticed.
    random_block = torch.randint(0, 4, (9,), generator=torch.Generator().manual_seed(0))
    blocks = torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(9) % 4, random_block])
    exact, variance = exact_brier(model, blocks)
    copies = 400
    # Roll-out groups of 3 rows: each block's rows (up to 7) take several passes over its cache.
    result = evaluate_brierlm(model, blocks.repeat(copies, 1), batch_size=400, progress=False, rollout_batch_size=3)
    assert_within_monte_carlo_error(result["brier"], exact, variance / copies)


def successor_model(vocab_size: int = 8) -> LlamaForCausalLM:
    """A Llama that predicts token x + 1 (mod V) after token x with probability 1 (to float32 precision)."""
    model = tiny_llama(vocab_size=vocab_size)
    with torch.no_grad():
        for layer in model.model.layers:  # no attention or MLP contribution: the residual stream is the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size, 16))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(50 * torch.eye(vocab_size, 16).roll(1, dims=0))  # row v reads dimension v - 1
    return model


def test_discrete_perfect_model_gets_the_maximum():
    model = successor_model()
    blocks = (torch.arange(4)[:, None] + torch.arange(12)) % 8
    result = evaluate_brierlm(model, blocks, batch_size=3, progress=False)
    assert result["brier"] == [1.0, 1.0, 1.0, 1.0] and result["brierlm"] == 100
    blocks[0, 6] = 0  # one wrong token lowers every n-gram that covers it
    assert all(b < 1 for b in evaluate_brierlm(model, blocks, batch_size=3, progress=False)["brier"])
    assert evaluate_brierlm(model, blocks[:, :5], progress=False)["num_positions_per_n"] == [16, 12, 8, 4]
    with pytest.raises(ValueError, match="block_size 4 is too short"):
        evaluate_brierlm(model, blocks[:, :4], progress=False)


# --- command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in CORPUS * 4))
    return path


@pytest.fixture(scope="module")
def calm_folder(tmp_path_factory, tokenizer_folder):
    folder = tmp_path_factory.mktemp("calm")
    tiny_model(patch_size=4).save_pretrained(folder)
    for file in tokenizer_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def cli_args(calm_folder, data_file, **options) -> list[str]:
    """evaluate_calm's argv: the model, the data, blocks of 16 tokens, and `--name value` for each option."""
    argv = ["--model", str(calm_folder), "--data", str(data_file), "--block-size", "16"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def test_cli_calm_writes_json(calm_folder, data_file, tmp_path, capsys):
    output = tmp_path / "result.json"
    options = dict(batch_size=2, max_blocks=5, documents_from=1, documents_to=9, seed=1, output=output)
    argv = cli_args(calm_folder, data_file, **options)
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == printed
    assert printed["estimator"] == "calm" and printed["num_blocks"] == 5 and printed["documents"] == [1, 9]
    assert printed["num_positions"] == 5 * 3 and len(printed["brier"]) == 4
    assert printed["brierlm"] == pytest.approx(brierlm(printed["brier"]))


def test_cli_discrete_model(tokenizer_folder, data_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    tiny_llama(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_folder))).save_pretrained(folder)
    argv = [
        "--model",
        str(folder),
        "--tokenizer",
        str(tokenizer_folder),
        "--data",
        str(data_file),
        "--block-size",
        "24",
        "--max-blocks",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["estimator"] == "discrete" and printed["num_positions_per_n"] == [3 * (24 - n) for n in range(1, 5)]


def test_cli_default_data_is_the_shared_wikitext(calm_folder, capsys):
    require_shared(DEFAULT_DATA)
    assert main(["--model", str(calm_folder), "--documents-to", "1", "--block-size", "64", "--max-blocks", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(DEFAULT_DATA)


def test_cli_errors(calm_folder, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(calm_folder), "--data", str(tmp_path / "nope.jsonl")])
    assert "nope.jsonl not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(calm_folder), "--data", str(data_file), "--documents-from", "50"])
    assert "selects no document of the 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no-model"), "--data", str(data_file)])
    assert f"no folder at {tmp_path / 'no-model'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(calm_folder), "--data", str(data_file), "--device", "nowhere"])
    assert "--device nowhere is not usable here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(data_file)])  # a folder without a model
    assert f"{tmp_path} has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a one-line error, not a traceback
        main(["--model", str(calm_folder), "--data", str(data_file), "--block-size", "18"])
    assert "block_size 18 must be a multiple of the model's patch_size=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the authors' checkpoint: converted first
        main(["--model", str(require_shared() / "calm"), "--tokenizer", str(calm_folder), "--data", str(data_file)])
    error = capsys.readouterr().err
    assert "checkpoint of the authors' code" in error and "calm-convert" in error


@pytest.mark.slow
def test_cli_runs_as_a_script(calm_folder, data_file, tmp_path, monkeypatch):
    """`python -m calm_transformers.evaluate_calm` in a fresh process, and run as a module in this one."""
    output = tmp_path / "script.json"
    argv = cli_args(calm_folder, data_file, max_blocks=2, output=output)
    run = subprocess.run(
        [sys.executable, "-m", "calm_transformers.evaluate_calm", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(output.read_text())["num_blocks"] == 2

    monkeypatch.setattr(sys, "argv", ["calm-eval", *argv, "--no-progress"])
    monkeypatch.delitem(sys.modules, "calm_transformers.evaluate_calm")  # run_module executes a fresh copy
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("calm_transformers.evaluate_calm", run_name="__main__")
    assert exit_info.value.code == 0
