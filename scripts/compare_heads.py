"""The paper's comparison of generative heads at this project's scale: the energy head and the authors' diffusion and
flow heads, each on the same backbone trained the same way for the same steps, one thread per run.

    python scripts/compare_heads.py                  # the learning test's corpus, 250 LM steps: a minute
    python scripts/compare_heads.py --shakespeare    # Shakespeare, 400 LM steps: 5 to 15 minutes of training per
                                                     # head, and 15 more for the diffusion head's evaluation

The learning corpus: one tokenizer and autoencoder, then an LM per head with the sizes and optimiser of
tests/test_learning.py. Shakespeare: the shipped model's tokenizer and autoencoder (calm_tiny_shakespeare/), the
same split (the last 2 works held out) and LM shape, its learning rate with a tenth of the steps warming up. Prints,
per head, the training time and the held-out evaluation of calm-train (energy levels with `context_learned`,
Brier-1..4), as JSON (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from calm_transformers.modeling_calm import CALMAutoencoder
from calm_transformers.train_calm import main as calm_train
from learning_corpus import train_lm, train_tokenizer_and_autoencoder

HEADS = ("energy", "diffusion", "flow")
REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "calm_tiny_shakespeare"
SHAKESPEARE = REPO.parent / "shared" / "data" / "shakespeare_works.json"
LEARNING_LM = ["--max-steps", "250", "--lr", "2e-3", "--warmup-steps", "20"]  # as tests/test_learning.py
SHAKESPEARE_LM = [  # the shipped LM's shape and learning rate (scripts/train_calm_tiny_shakespeare.sh)
    *("--set", "hidden_size=256", "--set", "intermediate_size=688", "--set", "num_hidden_layers=4"),
    *("--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "max_position_embeddings=512"),
    *("--batch-size", "8", "--lr", "1e-3", "--logging-steps", "50"),
]
BRIER = tuple(f"brier{n}" for n in range(1, 5))
KEYS = ("context_learned", *BRIER, "brierlm", "model", "shuffled", "context_free", "oracle")


def summary(folder: Path, seconds: float) -> dict[str, float]:
    """A run's steps, training time, time in all (with the final evaluation) and held-out evaluation."""
    results = json.loads((folder / "results.json").read_text())
    evaluation = {key: round(results["eval"][key], 5) for key in KEYS}
    return {
        "steps": results["steps"],
        "train_seconds": results["train_seconds"],
        "seconds": round(seconds),
        **evaluation,
    }


def run_heads(work: Path, heads: list[str], train: Callable[[Path, str], object]) -> dict[str, dict[str, float]]:
    """`train(folder, head)` for each head; their summaries."""
    results = {}
    for head in heads:
        start = time.perf_counter()
        train(work / f"lm_{head}", head)
        results[head] = summary(work / f"lm_{head}", time.perf_counter() - start)
        print(head, json.dumps(results[head]), flush=True)
    return results


def learning_corpus(work: Path, heads: list[str]) -> dict[str, dict[str, float]]:
    common = train_tokenizer_and_autoencoder(work)

    def train(folder: Path, head: str) -> None:
        train_lm(work, common, folder, [*LEARNING_LM, "--set", f"head_type={head}"])

    return run_heads(work, heads, train)


def shakespeare(work: Path, heads: list[str], steps: int) -> dict[str, dict[str, float]]:
    autoencoder = work / "autoencoder"
    CALMAutoencoder.from_pretrained(SHIPPED).save_pretrained(autoencoder)  # the shipped one, with its tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, autoencoder / name)
    common = ["--data", str(SHAKESPEARE), "--num-eval-docs", "2", "--no-progress", "--seed", "0", "--stage", "lm"]
    options = [*common, "--autoencoder", str(autoencoder), *SHAKESPEARE_LM, "--max-steps", str(steps)]
    options += ["--warmup-steps", str(steps // 10)]

    def train(folder: Path, head: str) -> None:
        calm_train([*options, "--output-dir", str(folder), "--set", f"head_type={head}"])

    return run_heads(work, heads, train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", action="store_true", help="Shakespeare's works instead of the learning corpus")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="default: all three")
    parser.add_argument("--steps", type=int, default=400, help="LM steps on Shakespeare (default 400)")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    if args.shakespeare:
        results = shakespeare(work, args.heads, args.steps)
    else:
        results = learning_corpus(work, args.heads)
    text = json.dumps({"corpus": "shakespeare" if args.shakespeare else "learning", "heads": results}, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
