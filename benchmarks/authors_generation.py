"""The authors' own CALM generation, timed for `benchmark_generation.py` in a process of its own.

It runs under a Python environment that has the authors' pinned transformers (4.43), with their `models/` package
(from a checkout of github.com/shaochenze/calm, never copied into this repository) on the path:

    AUTHORS_VENV/bin/python benchmarks/authors_generation.py build --code CALM_CHECKOUT --work DIR --shape calm-m
    AUTHORS_VENV/bin/python benchmarks/authors_generation.py time --code CALM_CHECKOUT --work DIR --cases JSON

`build` makes a random EnergyTransformer and its autoencoder and saves both as the authors' code saves them (the
benchmark converts the same weights for this project's column); `time` loads them and prints one JSON object:
seconds per case, for each case of the JSON list `[{"batch_size", "temperature", "prompt_length",
"max_new_tokens"}, ...]`. It imports nothing from this repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # the backbone and autoencoder of CALM-M (and a tiny one for checking the script)
    "calm-m": dict(
        hidden=1024, intermediate=2752, layers=16, heads=16, ae_hidden=512, ae_intermediate=1280, vocab=128257
    ),
    "tiny": dict(hidden=64, intermediate=176, layers=2, heads=4, ae_hidden=64, ae_intermediate=160, vocab=4096),
}


def build(work: Path, shape: str, seed: int) -> None:
    from models.configuration_autoencoder import AutoencoderConfig
    from models.configuration_calm import CALMConfig
    from models.modeling_autoencoder import Autoencoder
    from models.modeling_energy import EnergyTransformer

    s = SHAPES[shape]
    ids = dict(pad_token_id=s["vocab"] - 1, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    ae_config = AutoencoderConfig(
        vocab_size=s["vocab"], hidden_size=s["ae_hidden"], intermediate_size=s["ae_intermediate"], latent_size=128,
        patch_size=4, **ids,
    )  # fmt: skip
    Autoencoder(ae_config).save_pretrained(work / "autoencoder", safe_serialization=False)
    config = CALMConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        latent_size=128, noise_size=64, num_mlp_layers=4, num_samples=8, beta=1.0, patch_size=4,
        ae_path=str(work / "autoencoder"), max_position_embeddings=2048, **ids,
    )  # fmt: skip
    model = EnergyTransformer(config)
    with torch.no_grad():  # random weights: make the head's output depend on its noise (it starts at zero)
        model.generative_head.final_layer.linears[-1].weight.normal_(0, 0.02)
    model.save_pretrained(work / "calm", safe_serialization=False)


def time_cases(work: Path, cases: list[dict], dtype: str) -> dict:
    from models.modeling_energy import EnergyTransformer

    model = EnergyTransformer.from_pretrained(work / "calm", torch_dtype=getattr(torch, dtype)).eval()
    model.ae_model.to(getattr(torch, dtype))
    seconds = []
    for case in cases[:1] + cases:  # the first call warms up, untimed
        torch.manual_seed(0)
        prompt = torch.randint(2, model.config.vocab_size - 1, (case["batch_size"], case["prompt_length"]))
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt, max_length=case["prompt_length"] + case["max_new_tokens"], temperature=case["temperature"]
            )
        seconds.append(time.perf_counter() - start)
    import transformers

    return {"seconds": seconds[1:], "transformers": transformers.__version__, "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "time"))
    parser.add_argument("--code", required=True, help="a checkout of github.com/shaochenze/calm (its models/ folder)")
    parser.add_argument("--work", required=True, help="folder for the saved random model")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="calm-m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cases", default="[]", help="JSON list of cases to time")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.action == "build":
        build(work, args.shape, args.seed)
        print(json.dumps({"built": str(work)}))
    else:
        print(json.dumps(time_cases(work, json.loads(args.cases), args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
