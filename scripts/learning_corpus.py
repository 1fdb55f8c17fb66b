"""The learning test's corpus and recipe: a tiny tokenizer, autoencoder and CALM trained with `calm-train` on text
where context decides the next chunk. Used by tests/test_learning.py and the comparison scripts beside this file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from calm_transformers.train_calm import main

# Twelve words in a fixed cycle: after a few words of context the next chunk is certain, while a model that
# ignores its context can only draw from all the chunks the cycle makes.
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
LM = [
    *("hidden_size=64", "intermediate_size=128", "num_hidden_layers=2", "num_attention_heads=2"),
    *("num_key_value_heads=2", "noise_size=16", "num_mlp_layers=2", "num_samples=8", "num_target_samples=32"),
]
AUTOENCODER = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "latent_size=8",
               "--random-chunks", "0", "--block-size", "64", "--batch-size", "8", "--max-steps", "150",
               "--lr", "3e-3", "--warmup-steps", "10"]  # fmt: skip
# The LM stage's shape and length; the learning rate is the caller's.
LM_RUN = [*(arg for item in LM for arg in ("--set", item)), "--block-size", "64", "--batch-size", "8"]


def cycle_documents(num_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        start, length = rng.randrange(len(WORDS)), rng.randrange(40, 80)
        documents.append(" " + " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return documents


def common_options(root: Path) -> list[str]:
    """Writes the corpus (200 documents, the last 10 held out) under `root`; the options every stage shares."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in cycle_documents(200)))
    return ["--data", str(data), "--num-eval-docs", "10", "--no-progress", "--seed", "0", "--logging-steps", "50"]


def train_tokenizer_and_autoencoder(root: Path) -> list[str]:
    """The tokenizer (`root/tok`) and autoencoder (`root/ae`) stages; returns the common options."""
    common = common_options(root)
    main([*common, "--stage", "tokenizer", "--vocab-size", "300", "--output-dir", str(root / "tok")])
    main([*common, "--stage", "autoencoder", "--tokenizer", str(root / "tok"), "--output-dir", str(root / "ae"),
          *AUTOENCODER])  # fmt: skip
    return common


def train_lm(root: Path, common: list[str], folder: Path, options: list[str]) -> dict:
    """The LM stage on `root/ae` into `folder`, with `options` (steps, learning rate, `--set` overrides); returns
    its held-out evaluation (energy levels, Brier-n)."""
    main([*common, "--stage", "lm", "--autoencoder", str(root / "ae"), "--output-dir", str(folder), *LM_RUN, *options])
    return json.loads((folder / "results.json").read_text())["eval"]
