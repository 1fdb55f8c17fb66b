"""Generation speed, side by side in one run: this project's CALM `generate`, transformers' Llama `generate` on the
same backbone, and (optionally) the authors' own code on the same weights.

    python benchmarks/benchmark_generation.py                                  # CALM-M shapes, CPU, bf16
    python benchmarks/benchmark_generation.py --shape tiny --repeats 1         # seconds: checks the script
    python benchmarks/benchmark_generation.py --authors-code ~/calm --authors-python ~/calm-venv/bin/python
    python benchmarks/benchmark_generation.py --device cuda --compile          # + compiled backbones
    python benchmarks/benchmark_generation.py --head-types energy diffusion flow --batch-sizes 1   # per head

Columns, each a median over `--repeats` interleaved rounds:
- `calm`: `CALMForCausalLM.generate` (random weights of `--shape`, or `--model`), at each temperature.
- `llama`: `LlamaForCausalLM.generate`, greedy, a random Llama with CALM's backbone shape and vocabulary: the
  discrete model CALM is compared with in the paper (one token per step instead of K).
- `authors` (with `--authors-code`, a checkout of github.com/shaochenze/calm, and `--authors-python`, a Python with
  their transformers 4.43): their `EnergyTransformer.generate`, run by `authors_generation.py` in its own process.
  The random weights are made there and converted for the `calm` column, so both run the same model.
- with `--compile`: `calm-compiled` and `llama-compiled`, the backbone compiled and generating with a static cache.
- with `--head-types`, instead of the columns above: `calm-energy`, `calm-diffusion`, `calm-flow`, the same random
  backbone and autoencoder with a random head of each type.

Writes JSON (`--output`) with every timing, the machine, the versions, and the ratios it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from calm_transformers import CALMAutoencoderConfig, CALMConfig, CALMForCausalLM
from calm_transformers.convert_checkpoint import load_reference_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
SHAPES = {  # as in authors_generation.py: CALM-M (the paper's Table 1) and a tiny model for checks
    "calm-m": dict(
        hidden=1024, intermediate=2752, layers=16, heads=16, ae_hidden=512, ae_intermediate=1280, vocab=128257
    ),
    "tiny": dict(hidden=64, intermediate=176, layers=2, heads=4, ae_hidden=64, ae_intermediate=160, vocab=4096),
}


def random_calm(shape: str, head_type: str = "energy", like: CALMForCausalLM | None = None) -> CALMForCausalLM:
    """CALM with random weights of `shape` and a `head_type` head, whose layers that start at zero are made random
    too; with `like`, every weight but the head's is copied from that model."""
    s = SHAPES[shape]
    ids = dict(pad_token_id=s["vocab"] - 1, bos_token_id=0, eos_token_id=1)
    ae = CALMAutoencoderConfig(
        vocab_size=s["vocab"], hidden_size=s["ae_hidden"], intermediate_size=s["ae_intermediate"], latent_size=128,
        patch_size=4, **ids,
    )  # fmt: skip
    config = CALMConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], latent_size=128, noise_size=64,
        num_mlp_layers=4, patch_size=4, autoencoder_config=ae, head_type=head_type, **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CALMForCausalLM(config)
    head = model.generative_head
    if head_type == "energy":
        zero_at_init = [head.final_layer.linears[-1]]
    else:  # the iterative heads' adaLN modulations and output layer
        zero_at_init = [block.adaLN_modulation[-1] for block in head.net.res_blocks]
        zero_at_init += [head.net.final_layer.adaLN_modulation[-1], head.net.final_layer.linear]
    with torch.no_grad():
        for linear in zero_at_init:
            linear.weight.normal_(0, 0.02)
    if like is not None:
        rest = {key: value for key, value in like.state_dict().items() if not key.startswith("generative_head.")}
        model.load_state_dict(rest, strict=False)
    return model


def llama_like(calm: CALMForCausalLM) -> LlamaForCausalLM:
    """A random Llama with the CALM backbone's shape and vocabulary."""
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = LlamaConfig(
        **{name: getattr(calm.config, name) for name in fields},
        num_key_value_heads=calm.config.num_key_value_heads,
        max_position_embeddings=8192,
        pad_token_id=calm.config.pad_token_id,
        bos_token_id=calm.config.bos_token_id,
        eos_token_id=calm.config.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_generate(model: torch.nn.Module, case: dict, device: str, **settings: object) -> float:
    """Seconds for one `generate` call of `case` (random prompt ids, no EOS stop)."""
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(2, vocab - 1, (case["batch_size"], case["prompt_length"]), device=device)
    sync(device)
    start = time.perf_counter()
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=case["max_new_tokens"],
        min_new_tokens=case["max_new_tokens"],
        pad_token_id=vocab - 1,
        **settings,
    )
    sync(device)
    return time.perf_counter() - start


def authors_command(args: argparse.Namespace, action: str, work: Path, cases: list[dict] | None = None) -> dict:
    command = [args.authors_python, str(HERE / "authors_generation.py"), action, "--code", args.authors_code]
    command += ["--work", str(work), "--shape", args.shape, "--dtype", args.dtype]
    if cases is not None:
        command += ["--cases", json.dumps(cases)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0:
        raise SystemExit(f"the authors' code failed ({action}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_columns(args: argparse.Namespace, work: Path) -> dict[str, torch.nn.Module]:
    dtype = getattr(torch, args.dtype)
    if args.head_types:  # one `calm` column per head, on the same backbone and autoencoder
        energy = random_calm(args.shape)
        heads = {
            head: energy if head == "energy" else random_calm(args.shape, head, energy) for head in args.head_types
        }
        return {f"calm-{head}": model.to(device=args.device, dtype=dtype).eval() for head, model in heads.items()}
    if args.model:
        calm = CALMForCausalLM.from_pretrained(args.model)
    elif args.authors_code:
        authors_command(args, "build", work)
        calm = load_reference_checkpoint(work / "calm", work / "autoencoder")  # the same weights as `authors`
    else:
        calm = random_calm(args.shape)
    columns = {"calm": calm, "llama": llama_like(calm)}
    columns = {name: model.to(device=args.device, dtype=dtype).eval() for name, model in columns.items()}
    if args.compile:  # the same models, their backbones compiled while these columns run
        columns.update({f"{name}-compiled": model for name, model in list(columns.items())})
    return columns


def run_round(
    columns: dict, cases: list[dict], args: argparse.Namespace, work: Path, authors: bool = True
) -> dict[str, list[float]]:
    """One timing of every (column, case)."""
    seconds: dict[str, list[float]] = {}
    for name, model in columns.items():
        compiled = name.endswith("-compiled")
        if compiled:
            backbone = model.transformer if name.startswith("calm") else model.model
            backbone.forward = torch.compile(backbone.forward, mode=args.compile, dynamic=False)
        cache = {"cache_implementation": "static"} if compiled else {}
        times = []
        for case in cases:
            if name.startswith("llama"):  # greedy; a temperature means nothing to compare here
                settings = {"do_sample": False}
            else:
                settings = {"temperature": case["temperature"]}
                if args.num_candidates != 200:  # the default pool, left unset so that earlier versions run too
                    settings["num_candidates"] = args.num_candidates
            with torch.no_grad():
                times.append(time_generate(model, case, args.device, **settings, **cache))
        if compiled:
            del backbone.forward  # back to the eager method for the other columns
        seconds[name] = times
    if args.authors_code and authors:
        seconds["authors"] = authors_command(args, "time", work, cases)["seconds"]
    return seconds


def summarize(cases: list[dict], rounds: list[dict], columns: list[str]) -> list[dict]:
    """Median tokens/s per (column, case), and the ratios of `calm` to the other columns."""
    rows = []
    for i, case in enumerate(cases):
        row = dict(case)
        for name in columns:
            times = [r[name][i] for r in rounds]
            median = statistics.median(times)
            row[name] = {
                "seconds": times,
                "new_tokens_per_s": case["batch_size"] * case["max_new_tokens"] / median,
                "ms_per_step": 1000 * median / -(-case["max_new_tokens"] // 4),
            }
        for name in columns:
            if name != "calm" and "calm" in columns:
                row[f"calm_vs_{name}"] = row["calm"]["new_tokens_per_s"] / row[name]["new_tokens_per_s"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("batch  T     " + "".join(f"{name + ' tok/s':>22}" for name in columns) + "   calm / authors")
    for row in rows:
        cells = "".join(f"{row[name]['new_tokens_per_s']:>22.1f}" for name in columns)
        vs = f"{row['calm_vs_authors']:.2f}x" if "calm_vs_authors" in row else "-"
        print(f"{row['batch_size']:<6} {row['temperature']:<5.3g} {cells}   {vs}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("`", ""))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="calm-m", help="random weights of this shape")
    parser.add_argument("--model", help="a CALM folder to time instead of random weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="default: bfloat16"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5], help="default: 1.0 0.5")
    parser.add_argument("--num-candidates", type=int, default=200, help="pool size for T < 1 (default 200)")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per call (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument(
        "--compile", nargs="?", const="default", help="also time compiled backbones (torch.compile mode)"
    )
    parser.add_argument("--authors-code", help="a checkout of github.com/shaochenze/calm: adds the `authors` column")
    parser.add_argument("--authors-python", help="a Python with the authors' requirements (transformers 4.43)")
    parser.add_argument(
        "--head-types",
        nargs="+",
        choices=("energy", "diffusion", "flow"),
        help="instead of `calm` and `llama`: a `calm-HEAD` column per head type (random weights, one backbone)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu.")
    if bool(args.authors_code) != bool(args.authors_python):
        parser.error("--authors-code and --authors-python go together (the checkout, and the Python to run it).")
    if args.authors_code and (args.model or args.device != "cpu"):
        parser.error("the authors' column runs random weights on the CPU: drop --model / --device with it.")
    if args.head_types and (args.model or args.authors_code or args.compile):
        parser.error("--head-types times random weights of --shape: drop --model / --authors-code / --compile.")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [
        dict(batch_size=b, temperature=t, prompt_length=args.prompt_length, max_new_tokens=args.max_new_tokens)
        for t in args.temperatures
        for b in args.batch_sizes
    ]
    with tempfile.TemporaryDirectory() as scratch:
        columns = build_columns(args, Path(scratch))
        run_round(columns, cases, args, Path(scratch), authors=False)  # warm-up and compilation, not counted
        rounds = [run_round(columns, cases, args, Path(scratch)) for _ in range(args.repeats)]
    names = list(rounds[0])
    rows = summarize(cases, rounds, names)
    print_table(rows, names)
    meta = {
        "command": " ".join(["python benchmarks/benchmark_generation.py", *(argv or sys.argv[1:])]),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "calm_transformers": str(Path(sys.modules[CALMForCausalLM.__module__].__file__).parent),
    }
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
