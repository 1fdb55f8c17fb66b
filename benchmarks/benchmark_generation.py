"""Side-by-side generation speed: this project's CALM `generate`, transformers' Llama `generate` on the same
backbone, and a faithful re-implementation of the authors' generation step, in one run with interleaved repeats.

    python benchmarks/benchmark_generation.py                       # CALM-M shapes, CPU, bf16 + fp32, batch 1 + 8
    python benchmarks/benchmark_generation.py --device cuda --dtypes bfloat16
    python benchmarks/benchmark_generation.py --shape tiny --repeats 2   # seconds, to check the script
    python benchmarks/benchmark_generation.py --confident-head            # candidates that agree (shortlist pays)
    python benchmarks/benchmark_generation.py --model calm_tiny_wikitext  # a trained model (Llama: same shape)
    python benchmarks/benchmark_generation.py --compile --dtypes bfloat16  # + compiled backbones, static caches
    python benchmarks/benchmark_generation.py --device cuda --dtypes bfloat16 --compile reduce-overhead  # CUDA graphs

Columns: `llama` (transformers' LlamaForCausalLM.generate, greedy, same backbone shape), `calm` (this project's
generate), `calm-full` (the same with shortlist_size=0: every pool position projected onto the whole vocabulary),
`authors` (the reference's step: full decoder logits for every candidate, counted by a Python loop per row), and with
--compile `calm-compiled` and `llama-compiled` (the backbone compiled, generating with a static cache; the other
columns then run with compilation off).
Reports medians of new tokens/s and ms per step, the floor of a step (reading the weights it uses once, at the read
bandwidth measured in the same run) and how far above it the step is, the fraction of pool positions the shortlist
certified, peak memory above the loaded weights (measured in a separate run, so that the sampling thread does not
slow the timed ones, after handing freed memory back to the system, so that a run cannot hide its needs in what
earlier runs freed) and what the candidate pool adds to the memory of a T = 1 run, and a warning where the spread of
the repeats is large (shared machines are noisy). Writes JSON (--output) and a PNG plot (--plot).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the repository root as a package

try:
    from calm_transformers import CALMAutoencoderConfig, CALMConfig, CALMForCausalLM
except ImportError:  # a checkout whose folder is not named calm_transformers
    pkg = importlib.import_module(Path(__file__).resolve().parent.parent.name)
    CALMAutoencoderConfig, CALMConfig, CALMForCausalLM = pkg.CALMAutoencoderConfig, pkg.CALMConfig, pkg.CALMForCausalLM

COMPILED = "-compiled"  # a column's suffix under --compile: its backbone compiled, generating with a static cache

SHAPES = {
    # spec section 1: CALM-M with the released autoencoder (vocabulary 128257)
    "calm-m": dict(
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=16,
        num_attention_heads=16,
        ae_hidden=512,
        ae_intermediate=1280,
        vocab_size=128257,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        ae_hidden=64,
        ae_intermediate=160,
        vocab_size=4096,
    ),
}


def build_models(
    shape: str, dtype: torch.dtype, device: str, model_path: str | None = None, confident_head: bool = False
) -> tuple[CALMForCausalLM, torch.nn.Module]:
    """A CALM (random weights of `shape`, or loaded from `model_path`) and a random Llama of the same backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_path is not None:
        calm = CALMForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        llama_config = LlamaConfig(
            **{f: getattr(calm.config, f) for f in fields},
            num_key_value_heads=calm.config.num_key_value_heads,
            max_position_embeddings=8192,
            pad_token_id=calm.config.pad_token_id,
            bos_token_id=calm.config.bos_token_id,
            eos_token_id=calm.config.eos_token_id,
        )
        return calm, LlamaForCausalLM(llama_config).to(device=device, dtype=dtype).eval()
    s = SHAPES[shape]
    vocab = s["vocab_size"]
    ae = CALMAutoencoderConfig(
        vocab_size=vocab,
        hidden_size=s["ae_hidden"],
        intermediate_size=s["ae_intermediate"],
        latent_size=128,
        patch_size=4,
        pad_token_id=vocab - 1,
        bos_token_id=0,
        eos_token_id=1,
    )
    config = CALMConfig(
        vocab_size=vocab,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        latent_size=128,
        noise_size=64,
        num_mlp_layers=4,
        patch_size=4,
        autoencoder_config=ae,
        pad_token_id=vocab - 1,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    calm = CALMForCausalLM(config)
    with torch.no_grad():  # random weights: make the head's output depend on the noise (it is zero-initialised)
        last = calm.generative_head.final_layer.linears[-1]
        last.weight.normal_(0, 0.02)
        if confident_head:  # a head that barely depends on its noise: the pool's candidates agree
            last.weight.mul_(0.01)
            last.bias.normal_(0, 1.0)
    calm = calm.to(device=device, dtype=dtype).eval()
    llama_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        max_position_embeddings=8192,
        pad_token_id=vocab - 1,
        bos_token_id=0,
        eos_token_id=1,
    )
    llama = LlamaForCausalLM(llama_config).to(device=device, dtype=dtype).eval()
    return calm, llama


@torch.no_grad()
def authors_generate(
    model: CALMForCausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    num_samples: int,
    noise: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference loop (spec section 4): full decoder logits for every sample, counting by a Python loop."""
    k = model.config.patch_size
    batch = prompt.shape[0]
    ids = prompt
    embeds = model.embed_chunks(ids)
    cache = None
    steps = math.ceil(max_new_tokens / k)
    for step in range(steps):
        hidden, cache, _ = model.backbone(embeds, past_key_values=cache, use_cache=True)
        hidden = hidden[:, -1]
        if temperature == 1.0:
            step_noise = noise[step] if noise is not None else None
            latents = model.generative_head.sample(hidden, step_noise)  # [B, l]
            chunk = model.ae_model.decode(latents.unsqueeze(1)).argmax(-1)  # full logits [B, K, V]
        else:
            n = round(1 / temperature)
            latents = model.generative_head.sample(hidden.unsqueeze(1).expand(batch, num_samples, -1))
            tokens = model.ae_model.decode(latents.reshape(batch * num_samples, 1, -1)).argmax(-1)  # [B*N, K]
            tokens = tokens.reshape(batch, num_samples, k).tolist()
            chosen = []
            for row in tokens:  # the authors' per-row Python counting
                counts = Counter(tuple(c) for c in row)
                for m in range(n, 0, -1):
                    candidates = [(c, math.comb(cnt, m)) for c, cnt in counts.items() if cnt >= m]
                    if candidates:
                        weights = torch.tensor([w for _, w in candidates], dtype=torch.float64)
                        chosen.append(candidates[int(torch.multinomial(weights, 1))][0])
                        break
            chunk = torch.tensor(chosen, device=prompt.device)
        ids = torch.cat([ids, chunk], dim=-1)
        embeds = model.embed_chunks(chunk)
    return ids[:, : prompt.shape[1] + max_new_tokens]


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's malloc_trim), so that a run's peak RSS counts its
    own allocations: otherwise it reuses what earlier runs freed, and RSS does not grow with what it needs."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure as is
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting point: CUDA's allocator counter, or the process RSS sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process = psutil.Process()
            release_free_memory()
            self.base = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.extra_mib = (self.peak - self.base) / 2**20
        self.peak_total_mib = self.peak / 2**20


class PoolStats:
    """Counts what the shortlist certified, by wrapping the generation module's ShortlistArgmax while in use."""

    def __enter__(self) -> PoolStats:
        self.module = importlib.import_module(CALMForCausalLM.__module__.rsplit(".", 1)[0] + ".generation_calm")
        self.original = original = self.module.ShortlistArgmax
        self.decoders: list = []

        def counting(*args, **kwargs):
            self.decoders.append(original(*args, **kwargs))
            return self.decoders[-1]

        self.module.ShortlistArgmax = counting
        return self

    def __exit__(self, *exc) -> None:
        self.module.ShortlistArgmax = self.original

    def collect(self) -> tuple[int, int]:
        """(certified, requested) candidate positions since the last call."""
        certified = sum(d.certified for d in self.decoders)
        requested = sum(d.requested for d in self.decoders)
        self.decoders.clear()
        return certified, requested


def parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters, tied ones once."""
    params = {p.data_ptr(): p for m in modules for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


def step_weight_bytes(calm: CALMForCausalLM, llama: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights one generation step reads at least once, per column: every parameter but the token
    embedding tables a step only looks rows up in (CALM's encoder is unused too, but for its embedding: the decoder's
    output projection). A step cannot take less than reading these once: the floor the ms/step are compared with."""
    backbone = (calm.transformer.layers, calm.transformer.norm)
    head_and_decoder = (calm.generative_head, calm.ae_model.decoder, calm.ae_model.encoder.embed_tokens)
    return {
        "llama": parameter_bytes(llama.model.layers, llama.model.norm, llama.lm_head),
        "calm": parameter_bytes(*backbone, calm.embed_proj, *head_and_decoder),
    }


@torch.no_grad()
def read_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second this device reads from memory, measured: the median time of a max over an int32 buffer
    larger than its caches (a reduction does next to no arithmetic per byte)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.int32, device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.amax()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def run_once(
    kind: str,
    calm,
    llama,
    prompt,
    max_new_tokens,
    temperature,
    num_samples,
    device,
    measure_memory=False,
    backbones_compiled=False,
) -> dict:
    """One generation of `kind`. A `-compiled` kind runs the compiled backbone with a static cache (the same shapes
    every step: compiled once); with backbones_compiled, every other kind runs eagerly, as without --compile."""
    memory = PeakMemory(device) if measure_memory else contextlib.nullcontext()
    compiled = kind.endswith(COMPILED)
    kind = kind.removesuffix(COMPILED)
    cache_implementation = "static" if compiled else None
    eager = backbones_compiled and not compiled
    stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
    with memory, stance:
        start, cpu_start = time.perf_counter(), time.process_time()
        if kind in ("calm", "calm-full"):
            out = calm.generate(
                prompt,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                num_samples=num_samples,
                eos_token_id=None,
                shortlist_size=64 if kind == "calm" else 0,
                cache_implementation=cache_implementation,
            )
        elif kind == "authors":
            out = authors_generate(calm, prompt, max_new_tokens, temperature, num_samples)
        else:
            out = llama.generate(
                prompt,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=llama.config.pad_token_id,
                cache_implementation=cache_implementation,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    if measure_memory:
        return {"peak_mib": memory.extra_mib, "peak_total_mib": memory.peak_total_mib}
    new = (out.shape[1] - prompt.shape[1]) * out.shape[0]
    steps = max_new_tokens if kind == "llama" else math.ceil(max_new_tokens / calm.config.patch_size)
    return {
        "tokens_per_s": new / seconds,
        "ms_per_step": 1000 * seconds / steps,
        # CPU time of this process: on a shared CPU it is far less sensitive to other load than wall time.
        "cpu_ms_per_step": 1000 * cpu_seconds / steps,
    }


def check_same_tokens(calm, prompt) -> bool:
    """At T = 1 with the same head draws, the authors' loop and ours must give the same tokens."""
    steps = 3
    noise = [
        torch.rand(prompt.shape[0], calm.config.noise_size, generator=torch.Generator().manual_seed(s)).to(
            prompt.device, calm.dtype
        )
        - 0.5
        for s in range(steps)
    ]
    it = iter(noise)
    ours = calm.generate(
        prompt,
        max_new_tokens=4 * steps,
        do_sample=True,
        temperature=1.0,
        eos_token_id=None,
        noise_sampler=lambda shape, device, dtype: next(it),
    )
    theirs = authors_generate(calm, prompt, 4 * steps, 1.0, 1, noise)
    return torch.equal(ours, theirs)


def find_row(results: list[dict], match: dict) -> dict | None:
    """The first row whose fields have the values in `match` (None if there is none)."""
    return next((r for r in results if all(r[k] == v for k, v in match.items())), None)


def ratio(results: list[dict], a: dict, b: dict) -> float | None:
    """tokens/s of the row matching `a` over that of the row matching `b` (None if either is missing)."""
    ra, rb = find_row(results, a), find_row(results, b)
    return ra["tokens_per_s"] / rb["tokens_per_s"] if ra and rb else None


def summary(results: list[dict], dtypes: list[str], batches: list[int], temperatures: list[float]) -> list[str]:
    """The issue's targets as ratios measured in this run."""
    lines = []
    low = [t for t in temperatures if t < 1.0]
    for dtype in dtypes:
        for b in batches:
            base = {"dtype": dtype, "batch": b}
            compiled_calm, compiled_llama = {"model": "calm" + COMPILED}, {"model": "llama" + COMPILED}
            checks = [
                ("T=1 calm / llama", {"model": "calm", "temperature": 1.0}, {"model": "llama"}),
                ("T=1 calm-compiled / llama-compiled", {**compiled_calm, "temperature": 1.0}, compiled_llama),
                (
                    "T=1 calm-compiled / calm",
                    {**compiled_calm, "temperature": 1.0},
                    {"model": "calm", "temperature": 1.0},
                ),
                ("llama-compiled / llama", compiled_llama, {"model": "llama"}),
                ("T=1 calm / authors", {"model": "calm", "temperature": 1.0}, {"model": "authors", "temperature": 1.0}),
            ]
            for t in low:
                checks += [
                    (
                        f"T={t:g} calm / authors",
                        {"model": "calm", "temperature": t},
                        {"model": "authors", "temperature": t},
                    ),
                    (
                        f"T={t:g} calm-compiled / authors",
                        {**compiled_calm, "temperature": t},
                        {"model": "authors", "temperature": t},
                    ),
                    (
                        f"T={t:g} step / T=1 step (calm)",
                        {"model": "calm", "temperature": 1.0},
                        {"model": "calm", "temperature": t},
                    ),
                ]
            for label, a, c in checks:
                value = ratio(results, {**base, **a}, {**base, **c})
                if value is not None:
                    lines.append(f"{dtype:9} batch {b}: {label:36} {value:6.2f}x")
            for t in low:
                one = find_row(results, {**base, "model": "calm", "temperature": 1.0})
                pool = find_row(results, {**base, "model": "calm", "temperature": t})
                if one and pool:  # what the pool adds, against the memory of a T = 1 run: weights + workspace
                    added = pool["peak_mib"] - one["peak_mib"]
                    share = added / (one["weights_mib"] + one["peak_mib"])
                    lines.append(
                        f"{dtype:9} batch {b}: {f'T={t:g} memory added vs T=1 (calm)':36} {share:+6.1%} "
                        f"({added:+.0f} MiB on {one['weights_mib']:.0f} MiB of weights + {one['peak_mib']:.0f} MiB)"
                    )
    return lines


def measure(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    """Every case of one dtype: warm-up and peak memory, then interleaved timed repeats; medians."""
    results = []
    dtype = getattr(torch, dtype_name)
    calm, llama = build_models(args.shape, dtype, args.device, args.model, args.confident_head)
    print(
        f"# {args.model or args.shape} {dtype_name} on {args.device}: same tokens as the authors' loop at T=1: "
        f"{check_same_tokens(calm, torch.randint(3, 1000, (2, 8), device=args.device))}",
        flush=True,
    )
    if args.compile:  # in place (the parameters keep their names); eager cases run with compilation off
        mode = None if args.compile == "default" else args.compile
        calm.transformer.compile(mode=mode)
        llama.model.compile(mode=mode)
    kinds = ("llama", "calm", "calm-full", "authors") + (
        ("llama" + COMPILED, "calm" + COMPILED) if args.compile else ()
    )
    cases = [
        (kind, b, t)
        for b in args.batch_sizes
        for kind in kinds
        for t in ((None,) if kind.startswith("llama") else args.temperatures)
        if kind not in args.skip and not (kind == "calm-full" and t == 1.0)  # T=1 has no pool
    ]
    samples = {case: [] for case in cases}
    prompts = {b: torch.randint(3, 1000, (b, args.prompt_length), device=args.device) for b in args.batch_sizes}

    def run(case, **kwargs):
        kind, batch, temperature = case
        return run_once(
            kind,
            calm,
            llama,
            prompts[batch],
            args.max_new_tokens,
            temperature or 1.0,
            args.num_samples,
            args.device,
            backbones_compiled=args.compile is not None,
            **kwargs,
        )

    bandwidth = read_bandwidth(args.device)
    weight_bytes = step_weight_bytes(calm, llama)
    weights_mib = {"llama": parameter_bytes(llama) / 2**20, "calm": parameter_bytes(calm) / 2**20}
    print(
        f"# read bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per step: "
        f"Llama {weight_bytes['llama'] / 2**20:.0f} MiB, CALM {weight_bytes['calm'] / 2**20:.0f} MiB",
        flush=True,
    )
    pooled = {case: [0, 0] for case in cases}  # certified, requested
    warm_up_s = {}
    with PoolStats() as pool_stats:
        for case in cases:  # warm-up, and peak memory in a run of its own (the sampling thread costs time)
            start = time.perf_counter()
            run(case)
            warm_up_s[case] = time.perf_counter() - start  # with --compile, the first cases include compilation
            samples[case] = [run(case, measure_memory=True)]
            pool_stats.collect()
        for repeat in range(args.repeats):  # interleaved: every case once per round,
            for case in random.Random(repeat).sample(cases, len(cases)):  # in a new order (none always runs warm)
                samples[case].append(run(case))
                certified, requested = pool_stats.collect()
                pooled[case][0] += certified
                pooled[case][1] += requested
    for (kind, batch, temperature), (memory, *runs) in samples.items():
        weights_of = "llama" if kind.startswith("llama") else "calm"
        rates = [r["tokens_per_s"] for r in runs]
        median = statistics.median(rates)
        spread = (max(rates) - min(rates)) / median if median else 0.0
        certified, requested = pooled[(kind, batch, temperature)]
        results.append(
            {
                "model": kind,
                "dtype": dtype_name,
                "batch": batch,
                "temperature": temperature,
                "num_samples": args.num_samples if temperature not in (None, 1.0) else None,
                "tokens_per_s": median,
                "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
                "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in runs),
                # reading the step's weights once at the measured bandwidth (per token for llama, per chunk for calm)
                "floor_ms_per_step": 1000 * weight_bytes[weights_of] / bandwidth,
                "read_bandwidth_gb_s": bandwidth / 1e9,
                "weights_mib": weights_mib[weights_of],
                "peak_mib": memory["peak_mib"],
                "peak_total_mib": memory["peak_total_mib"],
                "certified": certified / requested if requested else None,
                "spread": spread,
                "runs": rates,
                "warm_up_s": warm_up_s[(kind, batch, temperature)],
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="calm-m")
    parser.add_argument("--model", default=None, help="a trained CALM folder instead of random weights of --shape")
    parser.add_argument("--confident-head", action="store_true", help="random head that barely depends on its noise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="also calm-compiled and llama-compiled: compiled backbones with static caches (others run eagerly); the "
        "optional value is torch.compile's mode (reduce-overhead: CUDA graphs on a GPU, the same as default on CPU)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="columns to leave out: llama, calm, calm-full, authors (--compile: also llama-compiled, calm-compiled)",
    )
    parser.add_argument("--output", default="benchmarks/results.json")
    parser.add_argument("--plot", default="benchmarks/results.png")
    args = parser.parse_args(argv)

    results = [row for dtype_name in args.dtypes for row in measure(args, dtype_name)]

    print(
        f"\n{'model':14} {'dtype':9} {'batch':>5} {'T':>5} {'tok/s':>9} {'ms/step':>9} {'cpu ms/step':>11} "
        f"{'floor ms':>8} {'x floor':>7} {'peak MiB':>9} {'certified':>9}  spread"
    )
    for r in results:
        t = "-" if r["temperature"] is None else f"{r['temperature']:g}"
        warn = "  <- noisy (>20%)" if r["spread"] > 0.2 else ""
        certified = "-" if r["certified"] is None else f"{r['certified']:.0%}"
        print(
            f"{r['model']:14} {r['dtype']:9} {r['batch']:>5} {t:>5} {r['tokens_per_s']:>9.1f} "
            f"{r['ms_per_step']:>9.1f} {r['cpu_ms_per_step']:>11.1f} {r['floor_ms_per_step']:>8.2f} "
            f"{r['ms_per_step'] / r['floor_ms_per_step']:>7.1f} {r['peak_mib']:>9.0f} {certified:>9}  "
            f"{r['spread']:.0%}{warn}"
        )
    ratios = summary(results, args.dtypes, args.batch_sizes, args.temperatures)
    print("\nRatios of medians, this run:\n" + "\n".join(ratios))
    meta = {
        "shape": args.model or args.shape + (" (confident head)" if args.confident_head else ""),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "prompt_length": args.prompt_length,
        "repeats": args.repeats,
        "compiled_backbones": args.compile,  # torch.compile's mode, or None
    }
    Path(args.output).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    if args.plot:
        plot(results, args.plot, meta)
    return 0


def plot(results: list[dict], path: str, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    labels, values, colors = [], [], []
    palette = {"llama": "tab:gray", "calm": "tab:blue", "calm-full": "tab:cyan", "authors": "tab:orange"}
    palette.update({"llama" + COMPILED: "black", "calm" + COMPILED: "tab:purple"})
    for r in results:
        t = "" if r["temperature"] is None else f" T={r['temperature']:g}"
        labels.append(f"{r['model']}{t}\n{r['dtype'][:4]} b{r['batch']}")
        values.append(r["tokens_per_s"])
        colors.append(palette[r["model"]])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(values)), 4))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("new tokens / s (median)")
    ax.set_title(f"{meta['shape']} generation on {meta['device']} ({meta['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
