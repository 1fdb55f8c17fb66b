"""What an autoencoder decodes from latents that are not exactly a chunk's: the share of real words in the text.

    python scripts/decode_diagnostics.py calm_tiny_shakespeare [--blocks 20] [--block-size 256]

Held-out blocks (the last two works of Shakespeare's, as the shipped model holds out) are encoded, and text is decoded
from: each chunk's own posterior sample (an oracle), posterior samples of random held-out chunks side by side (what a
perfect model that ignores its context would write), N(0, I) draws, and the posterior means with Gaussian noise of a
few sizes. Words are counted as in `sample_report.py`. Takes a CALM folder or an autoencoder folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from calm_transformers import CALMAutoencoder, CALMForCausalLM
from calm_transformers.evaluate_calm import load_documents, pack_documents
from sample_report import SHARED_DATA, known_words, words  # the script beside this one
from transformers import PreTrainedTokenizerFast

SHAKESPEARE = SHARED_DATA / "shakespeare_works.json"


def load_autoencoder(folder: str) -> CALMAutoencoder:
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") == "calm":
        return CALMForCausalLM.from_pretrained(folder).ae_model.eval()
    return CALMAutoencoder.from_pretrained(folder).eval()


def decoded_word_shares(
    autoencoder: CALMAutoencoder, tokenizer: PreTrainedTokenizerFast, blocks: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """Share of real words in the text decoded from each kind of latent, for token blocks [n, L]."""
    vocabulary = known_words()

    def share(ids: torch.Tensor) -> float:
        decoded = [words(tokenizer.decode(row, skip_special_tokens=True)) for row in ids]
        return sum(w in vocabulary for row in decoded for w in row) / max(1, sum(len(row) for row in decoded))

    torch.manual_seed(seed)
    with torch.no_grad():
        mean, log_std = autoencoder.encode(blocks)  # [n, P, l]
        std = log_std.exp()
        shuffle = torch.randperm(mean.shape[0] * mean.shape[1])
        random_chunks = mean.flatten(0, 1)[shuffle] + std.flatten(0, 1)[shuffle] * torch.randn_like(mean.flatten(0, 1))
        latents = {
            "text": None,
            "oracle": mean + std * torch.randn_like(mean),
            "context_free": random_chunks.view_as(mean),
            "prior": torch.randn_like(mean),
            **{f"mean_noise_{s}": mean + s * torch.randn_like(mean) for s in (0.3, 0.5, 1.0)},
        }
        return {name: share(blocks if z is None else autoencoder.decode_tokens(z)) for name, z in latents.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a CALM folder or an autoencoder folder, with its tokenizer")
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    blocks = pack_documents(tokenizer, load_documents(SHAKESPEARE)[-2:], args.block_size)[: args.blocks]
    shares = decoded_word_shares(load_autoencoder(args.model), tokenizer, blocks, args.seed)
    print(json.dumps({name: round(value, 4) for name, value in shares.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
