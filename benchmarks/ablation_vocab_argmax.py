"""Does `vocab_argmax` pay? `generate` end to end with it and with one plain matmul + argmax, side by side.

    python benchmarks/ablation_vocab_argmax.py [--shape calm-m] [--repeats 5] [--output scratch/ablation.json]

The two variants alternate within each round (random weights of `--shape`, bf16, prompt 64, 64 new tokens, T = 1 and
T = 0.5 with the default pool of 200, batch 1 and 8); medians of `--repeats` rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calm_transformers.modeling_calm as modeling  # noqa: E402
from benchmark_generation import random_calm, time_generate  # noqa: E402

VARIANTS = {
    "vocab_argmax": modeling.vocab_argmax,
    "one_matmul": lambda states, weight: F.linear(states, weight).argmax(-1),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("`", ""))
    parser.add_argument("--shape", default="calm-m", help="random weights of this shape (default: calm-m)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--output", type=Path, help="write the timings as JSON here")
    args = parser.parse_args(argv)
    model = random_calm(args.shape).to(torch.bfloat16).eval()
    cases = [dict(batch_size=b, temperature=t, prompt_length=64, max_new_tokens=64) for t in (1.0, 0.5) for b in (1, 8)]
    seconds = {(name, i): [] for name in VARIANTS for i in range(len(cases))}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):
            for name, argmax in VARIANTS.items():
                modeling.vocab_argmax = argmax
                for i, case in enumerate(cases):
                    elapsed = time_generate(model, case, "cpu", temperature=case["temperature"])
                    if round_:  # the first round warms up
                        seconds[(name, i)].append(elapsed)
    modeling.vocab_argmax = VARIANTS["vocab_argmax"]
    rows = []
    for i, case in enumerate(cases):
        row = dict(case)
        for name in VARIANTS:
            row[name] = case["batch_size"] * case["max_new_tokens"] / statistics.median(seconds[(name, i)])
        row["speedup"] = row["vocab_argmax"] / row["one_matmul"]
        rows.append(row)
        print(
            f"batch {case['batch_size']} T {case['temperature']}: vocab_argmax {row['vocab_argmax']:.1f} tok/s, "
            f"one matmul {row['one_matmul']:.1f} tok/s, x{row['speedup']:.2f}"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        raw = {f"{name} {i}": times for (name, i), times in seconds.items()}
        args.output.write_text(json.dumps({"results": rows, "seconds": raw}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
