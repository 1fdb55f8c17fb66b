"""Held-out BrierLM against training FLOPs, for a CALM and an autoregressive baseline, from `calm-train` results.

    python scripts/plot_brierlm.py WORK/autoencoder/results.json WORK/lm/results.json WORK/ar/results.json \
        --output docs/brierlm_vs_flops.png

Each point is one evaluation during training (`--eval-steps`); its FLOPs are the measured FLOPs per step times the
steps so far. The CALM curve starts at the autoencoder's training FLOPs, which it needed first. Needs matplotlib
(`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curve(results: dict, key: str = "eval_brierlm", offset: float = 0.0) -> tuple[list[float], list[float]]:
    """(FLOPs, value of `key`) at each evaluation in `results["log_history"]`."""
    per_step = results["train_flops"] / max(results["steps"], 1)
    points = [(offset + per_step * e["step"], e[key]) for e in results["log_history"] if key in e]
    return [x for x, _ in points], [y for _, y in points]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("autoencoder", type=Path, help="the autoencoder stage's results.json")
    parser.add_argument("lm", type=Path, help="the CALM lm stage's results.json")
    parser.add_argument("ar", type=Path, help="the ar (Llama baseline) stage's results.json")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    autoencoder, lm, ar = (json.loads(path.read_text()) for path in (args.autoencoder, args.lm, args.ar))
    # BrierLM is 0 while Brier-3 or Brier-4 is not positive, as for small models: Brier-1 and Brier-2 show more.
    figure, panels = plt.subplots(1, 3, figsize=(13, 4))
    offset = autoencoder["train_flops"]
    for axes, key, title in zip(
        panels, ("eval_brierlm", "eval_brier1", "eval_brier2"), ("BrierLM", "Brier-1", "Brier-2"), strict=True
    ):
        axes.plot(*curve(lm, key, offset), "o-", label="CALM (K = 4), incl. autoencoder")
        axes.plot(*curve(ar, key), "s-", label="Llama baseline (K = 1)")
        axes.set_title(f"held-out {title}")
        axes.set_xlabel("training FLOPs")
        axes.grid(alpha=0.3)
    panels[0].legend()
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
