"""CALM learns context: a tiny autoencoder + CALM trained with `calm-train` on text where context decides the next
chunk, scored by `energy_levels` against the context-free and oracle levels on held-out documents."""

from __future__ import annotations

import pytest
import torch
from calm_transformers import CALMForCausalLM
from calm_transformers.evaluate_calm import energy_levels, pack_documents
from learning_corpus import cycle_documents, train_lm, train_tokenizer_and_autoencoder
from transformers import PreTrainedTokenizerFast

pytestmark = pytest.mark.slow  # conversions, training runs or subprocesses: minutes


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[CALMForCausalLM, torch.Tensor, dict]:
    """Tokenizer, autoencoder and CALM trained through `calm-train` (about a minute on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("learning")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    try:
        common = train_tokenizer_and_autoencoder(root)
        results = train_lm(root, common, root / "lm", ["--max-steps", "250", "--lr", "2e-3", "--warmup-steps", "20"])
    finally:
        torch.set_num_threads(threads)
    model = CALMForCausalLM.from_pretrained(root / "lm").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "lm")
    held_out = pack_documents(tokenizer, cycle_documents(200)[-10:], block_size=64)
    return model, held_out, {"eval": results}


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
