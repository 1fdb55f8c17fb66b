"""calm-generate: stream text from a CALM model. With no --model, the small CALM shipped in this package.

calm-generate "The history of the city"
calm-generate "The history of the city" --model ./my-converted-calm --temperature 0.5 --num-candidates 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .modeling_calm import CALMForCausalLM
from .utils_calm import DTYPES, device_problem, folder_problem

DEFAULT_MODEL = Path(__file__).resolve().parent / "calm_tiny_shakespeare"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calm-generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="The", help="text to continue (default: %(default)r)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder or Hub id (default: the shipped one)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="in (0, 1]; default: the model's generation_config"
    )
    parser.add_argument(
        "--num-candidates",
        type=int,
        default=None,
        help="candidate chunks drawn per step for temperature < 1 (default: the model's generation_config)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default: float32)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:1, ... (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="for reproducible output")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer, TextStreamer

    if args.model == str(DEFAULT_MODEL) and not DEFAULT_MODEL.is_dir():
        parser.error(f"the shipped model is missing from {DEFAULT_MODEL}; pass --model")
    problem = folder_problem(args.model) or device_problem(args.device)
    if problem:
        parser.error(problem)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = CALMForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    except (OSError, ValueError) as error:  # a folder or Hub id without a model or tokenizer, or not a CALM
        parser.error(f"could not load --model {args.model}: {error}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    settings = {"temperature": args.temperature, "num_candidates": args.num_candidates}
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    if tokenizer.bos_token_id is not None and inputs.input_ids[0, 0] != tokenizer.bos_token_id:
        # The model was trained on BOS + text.
        bos = torch.tensor([[tokenizer.bos_token_id]], device=args.device)
        inputs["input_ids"] = torch.cat([bos, inputs.input_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs.input_ids)
    try:
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_special_tokens=True),
            **{k: v for k, v in settings.items() if v is not None},
        )
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
