"""The learning test's corpus: share of context learned after 250 LM steps under four optimiser settings.

    python scripts/compare_lm_optimisers.py      # from the repository root; about a minute on one thread

The tokenizer, autoencoder and LM sizes are those of tests/test_learning.py; only the LM's learning rate and
warm-up change. Prints the held-out energy levels of each run (docs/training.md).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from calm_transformers.train_calm import main  # noqa: E402
from test_learning import LM, cycle_documents  # noqa: E402

SETTINGS = {
    "authors: 3e-4, warm-up 2000": ["--lr", "3e-4", "--warmup-steps", "2000"],
    "3e-4, warm-up 20": ["--lr", "3e-4", "--warmup-steps", "20"],
    "1e-3, warm-up 20": ["--lr", "1e-3", "--warmup-steps", "20"],
    "2e-3, warm-up 20": ["--lr", "2e-3", "--warmup-steps", "20"],
}
AUTOENCODER = ["--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "latent_size=8",
               "--random-chunks", "0", "--block-size", "64", "--batch-size", "8", "--max-steps", "150",
               "--lr", "3e-3", "--warmup-steps", "10"]  # fmt: skip


def compare() -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in cycle_documents(200)))
    common = ["--data", str(data), "--num-eval-docs", "10", "--no-progress", "--seed", "0", "--logging-steps", "50"]
    main([*common, "--stage", "tokenizer", "--vocab-size", "300", "--output-dir", str(root / "tok")])
    main([*common, "--stage", "autoencoder", "--tokenizer", str(root / "tok"), "--output-dir", str(root / "ae"),
          *AUTOENCODER])  # fmt: skip
    levels = {}
    for number, (name, options) in enumerate(SETTINGS.items()):
        folder = root / f"lm{number}"
        main([*common, "--stage", "lm", "--autoencoder", str(root / "ae"), "--output-dir", str(folder),
              *(arg for item in LM for arg in ("--set", item)), "--block-size", "64", "--batch-size", "8",
              "--max-steps", "250", *options])  # fmt: skip
        evaluation = json.loads((folder / "results.json").read_text())["eval"]
        keys = ("context_learned", "model", "context_free", "oracle")
        levels[name] = {key: round(evaluation[key], 3) for key in keys}
    return levels


if __name__ == "__main__":
    print(json.dumps(compare(), indent=1))
