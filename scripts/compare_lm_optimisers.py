"""The learning test's corpus: share of context learned after 250 LM steps under four optimiser settings.

    python scripts/compare_lm_optimisers.py      # from the repository root; about a minute on one thread

The tokenizer, autoencoder and LM sizes are those of tests/test_learning.py; only the LM's learning rate and
warm-up change. Prints the held-out energy levels of each run (docs/training.md).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from learning_corpus import train_lm, train_tokenizer_and_autoencoder

SETTINGS = {
    "authors: 3e-4, warm-up 2000": ["--lr", "3e-4", "--warmup-steps", "2000"],
    "3e-4, warm-up 20": ["--lr", "3e-4", "--warmup-steps", "20"],
    "1e-3, warm-up 20": ["--lr", "1e-3", "--warmup-steps", "20"],
    "2e-3, warm-up 20": ["--lr", "2e-3", "--warmup-steps", "20"],
}


def compare() -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    common = train_tokenizer_and_autoencoder(root)
    levels = {}
    for number, (name, options) in enumerate(SETTINGS.items()):
        evaluation = train_lm(root, common, root / f"lm{number}", ["--max-steps", "250", *options])
        keys = ("context_learned", "model", "context_free", "oracle")
        levels[name] = {key: round(evaluation[key], 3) for key in keys}
    return levels


if __name__ == "__main__":
    print(json.dumps(compare(), indent=1))
