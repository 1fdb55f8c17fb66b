"""Short side-by-side runs of the shipped model's recipe with one lever changed from the defaults (energy head of 2
blocks, K = 4, 2048 tokens): K, the head, its size, the vocabulary. Each run trains (or reuses) a tokenizer and an
autoencoder for its K and vocabulary, an LM of the shipped shape, and reports calm-train's held-out evaluation and the
share of real words in its samples (docs/training.md).

    python scripts/compare_shipped_settings.py --work /tmp/settings --name flow_k2 --patch-size 2 --set head_type=flow
    python scripts/compare_shipped_settings.py --work /tmp/settings --evaluate RUN/checkpoint-1000 --name long_1000
    python scripts/compare_shipped_settings.py --work /tmp/settings --table      # every finished run, as Markdown

Tokenizers (`tokenizer_v{V}`) and autoencoders (`autoencoder_k{K}_v{V}`) are trained once per work folder with the
shipped recipe (scripts/train_calm_tiny_shakespeare.sh). The LM: the shipped shape and optimiser, `--steps` steps
with a tenth warming up, one thread. Each run writes `lm_{name}/summary.json`: steps, training time, context
learned, Brier-1..4 and real words at T = 0.5 and 1 (scripts/sample_report.py). `--evaluate` measures the same of a
saved LM or a Trainer checkpoint of one (e.g. a long run's, for its figures at several budgets), with its training
time read as a share of the run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from calm_transformers.evaluate_calm import load_documents, pack_documents
from calm_transformers.modeling_calm import CALMForCausalLM
from calm_transformers.train_calm import main as calm_train
from calm_transformers.train_calm import stage_metrics
from compare_heads import BRIER, SHAKESPEARE, SHAKESPEARE_LM  # the scripts beside this one
from sample_report import report
from transformers import AutoTokenizer

COMMON = ["--data", str(SHAKESPEARE), "--num-eval-docs", "2", "--no-progress", "--seed", "0"]
AUTOENCODER = [  # as scripts/train_calm_tiny_shakespeare.sh
    *("--set", "hidden_size=128", "--set", "intermediate_size=256", "--set", "latent_size=64"),
    *("--set", "kl_weight=0.01", "--batch-size", "4", "--max-steps", "3000", "--lr", "3e-3"),
    *("--lr-scheduler", "cosine", "--warmup-steps", "100", "--logging-steps", "500"),
]


def autoencoder_for(work: Path, patch_size: int, vocab_size: int) -> Path:
    """The autoencoder folder (with its tokenizer) for K and the vocabulary, trained if not there yet."""
    folder = work / f"autoencoder_k{patch_size}_v{vocab_size}"
    if (folder / "model.safetensors").exists():
        return folder
    tokenizer = work / f"tokenizer_v{vocab_size}"
    if not (tokenizer / "tokenizer.json").exists():
        calm_train([*COMMON, "--stage", "tokenizer", "--vocab-size", str(vocab_size), "--output-dir", str(tokenizer)])
    calm_train([*COMMON, "--stage", "autoencoder", "--tokenizer", str(tokenizer), "--output-dir", str(folder),
                *AUTOENCODER, "--set", f"patch_size={patch_size}"])  # fmt: skip
    return folder


def run(args: argparse.Namespace) -> dict:
    autoencoder = autoencoder_for(args.work, args.patch_size, args.vocab_size)
    folder = args.work / f"lm_{args.name}"
    options = [*COMMON, "--stage", "lm", "--autoencoder", str(autoencoder), "--output-dir", str(folder)]
    options += SHAKESPEARE_LM  # the shipped LM's shape and optimiser
    options += ["--max-steps", str(args.steps), "--warmup-steps", str(args.steps // 10)]
    calm_train([*options, *(item for pair in args.set for item in ("--set", pair))])
    return summarise(folder, args.name, *final_evaluation(folder))


def final_evaluation(folder: Path) -> tuple[int, dict]:
    """A finished run's steps, and its training time, FLOPs and held-out evaluation (results.json)."""
    results = json.loads((folder / "results.json").read_text())
    return results["steps"], {
        "train_seconds": results["train_seconds"],
        "train_flops": results["train_flops"],
        **results["eval"],
    }


def evaluate(checkpoint: Path, work: Path, name: str) -> dict:
    """A run's saved LM (its final evaluation is read) or a Trainer checkpoint of it (measured as calm-train measures
    at the end of a run, its time and FLOPs as the share of its steps in the run's)."""
    if not (checkpoint / "trainer_state.json").exists():  # the run's saved model
        return summarise(checkpoint, name, *final_evaluation(checkpoint))
    results = json.loads((checkpoint.parent / "results.json").read_text())
    steps = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.parent)
    folder = work / f"lm_{name}"  # the model with its tokenizer, for the samples
    CALMForCausalLM.from_pretrained(checkpoint).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = CALMForCausalLM.from_pretrained(folder).eval()
    blocks = pack_documents(tokenizer, load_documents(SHAKESPEARE)[-2:], 512)
    share = steps / results["steps"]
    evaluation = {
        "train_seconds": results["train_seconds"] * share,
        "train_flops": results["train_flops"] * share,
        **stage_metrics("lm", model, blocks, batch_size=8, seed=0),
    }
    return summarise(folder, name, steps, evaluation)


def summarise(folder: Path, name: str, steps: int, evaluation: dict) -> dict:
    """The row of the table: the run's settings, its evaluation and its samples' share of real words."""
    config = json.loads((folder / "config.json").read_text())
    samples = report(str(folder))
    (folder / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    summary = {
        "name": name,
        "patch_size": config["patch_size"],
        "vocab_size": config["vocab_size"],
        "head": f"{config['head_type']}, {config['num_mlp_layers']} blocks",
        "steps": steps,
        "train_seconds": evaluation["train_seconds"],
        "train_flops": evaluation["train_flops"],
        "context_learned": evaluation["context_learned"],
        **{key: evaluation[key] for key in BRIER},
        **{f"real_words_t{t}": part["known_word_share"] for t, part in samples["temperatures"].items()},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(work: Path) -> str:
    """Every finished run under `work`, as a Markdown table."""
    rows = [
        "| run | K | head | vocabulary | steps | training FLOPs | training time | context learned | Brier-1 | Brier-2 "
        "| Brier-3 | Brier-4 | real words T = 0.5 | T = 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(work.glob("lm_*/summary.json")):
        s = json.loads(path.read_text())
        briers = " | ".join(f"{s[key]:.2g}" for key in BRIER)
        rows.append(
            f"| {s['name']} | {s['patch_size']} | {s['head']} | {s['vocab_size']} | {s['steps']} "
            f"| {s['train_flops']:.1e} | {s['train_seconds'] / 60:.0f} min | {100 * s['context_learned']:.1f}% "
            f"| {briers} "
            f"| {100 * s['real_words_t0.5']:.1f}% | {100 * s['real_words_t1.0']:.1f}% |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of the runs (tokenizers, autoencoders, LMs)")
    parser.add_argument("--name", help="the run's name (its folder is lm_NAME)")
    parser.add_argument("--patch-size", type=int, default=4, help="K, tokens per chunk (default 4)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048)")
    parser.add_argument("--steps", type=int, default=500, help="LM steps (default 500)")
    parser.add_argument("--set", action="append", default=[], help="an LM config field, e.g. head_type=flow")
    parser.add_argument("--evaluate", type=Path, help="measure this saved LM or checkpoint instead of training")
    parser.add_argument("--table", action="store_true", help="print the finished runs as a Markdown table")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.work))
        return 0
    if not args.name:
        parser.error("--name is required to train a run")
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    summary = evaluate(args.evaluate, args.work, args.name) if args.evaluate else run(args)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
