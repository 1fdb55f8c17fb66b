"""Where the time of one CALM generation step goes: each part timed on its own, with the shapes of a real step.

    python benchmarks/step_breakdown.py                              # CALM-M shapes, bf16, batch 1 and 8, N = 200
    python benchmarks/step_breakdown.py --dtype float32 --batches 1
    python benchmarks/step_breakdown.py --model calm_tiny_wikitext   # a trained model
    python benchmarks/step_breakdown.py --shape tiny --repeats 3     # seconds, to check the script

Parts: the backbone step (one chunk, KV cache of the prompt), the energy head (1 sample, and N for T < 1), the
decoder up to `expand_layer` for the pool, the first token's decoder states and their projection onto the vocabulary
(what decoding a pool of diverse candidates costs; for float32 models on CPUs with bf16 units `argmax_tokens` screens
in bf16, so `blocked_argmax` is timed too), the same projection's matmuls without the argmax, and
the chosen chunk's decode; then a whole `_next_chunk` at T = 1 and T = 0.5. Medians of `--repeats` runs, in ms.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_generation import SHAPES, build_models  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def projection_matmuls(states: torch.Tensor, weight: torch.Tensor, vocab_block: int, modeling: ModuleType) -> None:
    """The matmuls of `blocked_argmax` (its blocks, orientation, padding and output buffer), without the argmax."""
    states_t = modeling._matmul_operand(states.T)
    buffer = states.new_empty(vocab_block, states_t.shape[1])
    for block in weight.split(vocab_block):
        torch.mm(block, states_t, out=buffer[: len(block)])


@torch.no_grad()
def breakdown(calm, batch: int, num_samples: int, prompt_len: int, repeats: int) -> dict[str, float]:
    config = calm.config
    dtype = calm.dtype
    device = calm.device
    prompt = torch.randint(0, config.vocab_size - 1, (batch, prompt_len), device=device)
    embeds = calm.embed_chunks(prompt)
    _, cache, _ = calm.backbone(embeds, use_cache=True)
    last = embeds[:, -1:]
    hidden = torch.randn(batch, config.hidden_size, dtype=dtype, device=device)
    latents = calm.generative_head.sample(hidden, num_samples=num_samples)  # [B, N, l]
    decoder, ae = calm.ae_model.decoder, calm.ae_model
    chunk_states = decoder.chunk_state(latents).flatten(0, 1)  # [B*N, a]
    first_states = decoder.token_states(chunk_states, slice(0, 1))[:, 0]  # [B*N, a]
    weight = ae.encoder.embed_tokens.weight
    chosen = latents[:, :1]  # [B, 1, l]
    next_chunk = calm._next_chunk  # hidden [B, d] -> tokens [B, K], the whole step after the backbone
    modeling = sys.modules[type(calm).__module__]  # the package's modeling_calm
    blocked_argmax = modeling.blocked_argmax
    vocab_block = modeling._cpu_vocab_block(len(first_states)) if device.type == "cpu" else weight.shape[0]

    parts = {
        "backbone step (+ cache copy)": lambda: calm.backbone(last, None, None, copy.deepcopy(cache), use_cache=True),
        "cache copy alone": lambda: copy.deepcopy(cache),
        "head, 1 sample": lambda: calm.generative_head.sample(hidden),
        f"head, {num_samples} samples per row": lambda: calm.generative_head.sample(hidden, num_samples=num_samples),
        "pool: chunk_state": lambda: decoder.chunk_state(latents),
        "pool: first token's states": lambda: decoder.token_states(chunk_states, slice(0, 1)),
        "pool: first token's argmax": lambda: ae.argmax_tokens(first_states),
        "pool: the same, by blocked_argmax": lambda: blocked_argmax(first_states, weight),
        "pool: the same matmuls, no argmax": lambda: projection_matmuls(first_states, weight, vocab_block, modeling),
        "chosen chunk: decode_tokens": lambda: ae.decode_tokens(chosen),
        "_next_chunk, T = 1": lambda: next_chunk(hidden, 1, 1.0, True, None, None),
        f"_next_chunk, T = 0.5, N = {num_samples}": lambda: next_chunk(hidden, num_samples, 0.5, True, None, None),
    }
    return {name: median_ms(fn, repeats) for name, fn in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="calm-m")
    parser.add_argument("--model", default=None, help="a trained CALM folder instead of random weights of --shape")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    calm, _ = build_models(args.shape, getattr(torch, args.dtype), args.device, args.model)
    where = f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# {args.model or args.shape} {args.dtype} on {where}")
    for batch in args.batches:
        print(f"\nbatch {batch}, median of {args.repeats} (ms):")
        for name, ms in breakdown(calm, batch, args.num_samples, args.prompt_length, args.repeats).items():
            print(f"  {name:<38} {ms:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
