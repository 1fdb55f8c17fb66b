"""CALM learns context: a tiny autoencoder + CALM trained with `calm-train` on text where context decides the next
chunk, scored by `energy_levels` against the context-free and oracle levels on held-out documents."""

from __future__ import annotations

import json
import random

import pytest
import torch
from calm_transformers import CALMForCausalLM
from calm_transformers.evaluate_calm import energy_levels
from calm_transformers.train_calm import lm_blocks, main
from transformers import PreTrainedTokenizerFast

# Twelve words in a fixed cycle: after a few words of context the next chunk is certain, while a model that
# ignores its context can only draw from all the chunks the cycle makes.
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
LM = [
    *("hidden_size=64", "intermediate_size=128", "num_hidden_layers=2", "num_attention_heads=2"),
    *("num_key_value_heads=2", "noise_size=16", "num_mlp_layers=2", "num_samples=8", "num_target_samples=32"),
]


def cycle_documents(num_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        start, length = rng.randrange(len(WORDS)), rng.randrange(40, 80)
        documents.append(" " + " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return documents


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[CALMForCausalLM, torch.Tensor, dict]:
    """Tokenizer, autoencoder and CALM trained through `calm-train` (about a minute on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("learning")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in cycle_documents(200)))
    common = ["--data", str(data), "--num-eval-docs", "10", "--no-progress", "--seed", "0", "--logging-steps", "50"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    try:
        main([*common, "--stage", "tokenizer", "--vocab-size", "300", "--output-dir", str(root / "tok")])
        main([*common, "--stage", "autoencoder", "--tokenizer", str(root / "tok"), "--output-dir", str(root / "ae"),
              "--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "latent_size=8",
              "--random-chunks", "0", "--block-size", "64", "--batch-size", "8", "--max-steps", "150",
              "--lr", "3e-3", "--warmup-steps", "10"])  # fmt: skip
        main([*common, "--stage", "lm", "--autoencoder", str(root / "ae"), "--output-dir", str(root / "lm"),
              *(x for item in LM for x in ("--set", item)), "--block-size", "64", "--batch-size", "8",
              "--max-steps", "250", "--lr", "2e-3", "--warmup-steps", "20"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    model = CALMForCausalLM.from_pretrained(root / "lm").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "lm")
    held_out = lm_blocks(tokenizer, cycle_documents(200)[-10:], block_size=64)
    results = json.loads((root / "lm" / "results.json").read_text())
    return model, held_out, results


def test_calm_learns_to_use_its_context(trained):
    model, held_out, results = trained
    levels = energy_levels(model, held_out)
    gap = levels["context_free"] - levels["oracle"]
    assert gap > 0.5, levels  # the corpus makes context matter: the two reference levels are far apart
    assert levels["context_learned"] >= 0.5, levels
    assert levels["shuffled"] > levels["model"] + 0.25 * gap, levels  # worse without its context
    # calm-train reports the same levels for its held-out documents.
    assert results["eval"]["context_learned"] == pytest.approx(levels["context_learned"], abs=1e-6)


def test_energy_levels_catch_a_head_that_ignores_its_context(trained):
    """The check above fails for the same model when its head cannot see the backbone's state."""
    model, held_out, _ = trained
    head = model.generative_head
    saved = {name: p.detach().clone() for name, p in head.hidden_embd.named_parameters()}
    try:
        with torch.no_grad():
            head.hidden_embd.weight.zero_()  # y = LayerNorm(bias): the same for every context
        levels = energy_levels(model, held_out)
    finally:
        with torch.no_grad():
            for name, p in head.hidden_embd.named_parameters():
                p.copy_(saved[name])
    assert levels["context_learned"] < 0.5, levels
    assert abs(levels["shuffled"] - levels["model"]) < 0.1 * (levels["context_free"] - levels["oracle"]), levels
