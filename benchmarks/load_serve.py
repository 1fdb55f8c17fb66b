"""What the server costs: calm-serve under 1, 4 and 8 concurrent clients, beside CALM's `generate` called directly.

    python benchmarks/load_serve.py --output benchmarks/results_serve_cpu.json        # the shipped model
    python benchmarks/load_serve.py --requests 4 --max-tokens 8 --concurrency 1 2     # seconds: checks the script

Starts `calm-serve MODEL` on 127.0.0.1 (a free port) and waits for /health. Each round sends `--requests`
completions at each concurrency with the `openai` client (the same prompt, seeds 0, 1, ..., each generating exactly
`--max-tokens` tokens: `min_new_tokens` through the server's `generation_config` field), then times `generate` in this
process on the same requests, one at a time and as one batch, while the server idles. Rounds interleave the
configurations, so that the machine's drift reaches them alike. Bounded: a fixed number of requests, a timeout for
the start and for each answer; the server is stopped by its PID. Writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from calm_transformers import CALMForCausalLM
from calm_transformers.cli import DEFAULT_MODEL
from transformers import AutoTokenizer

PROMPT = "My lord, the king"
START_SECONDS, ANSWER_SECONDS = 300, 300


def summary(latencies: list[float], wall: float) -> dict:
    """Requests per second over the wall time, and the median and p90 of the latencies, in ms."""
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "requests_per_s": len(ordered) / wall,
        "median_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def start_server(model: str, port: int, threads: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "calm_transformers.serve", model, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the model's process: torch's threads
    with open(log, "w") as output:
        return subprocess.Popen([*command, "--device", "cpu"], env=env, stdout=output, stderr=subprocess.STDOUT)


def wait_for_health(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if json.load(response) == {"status": "ok"}:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"calm-serve did not start:\n{log.read_text()[-3000:]}")


def server_client(url: str, model: str, max_tokens: int) -> Callable[[int], float]:
    """A completion of `max_tokens` tokens with seed `seed` through the server; returns its latency."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=ANSWER_SECONDS)
    exact_length = {"generation_config": json.dumps({"min_new_tokens": max_tokens})}

    def complete(seed: int) -> float:
        start = time.perf_counter()
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=max_tokens, seed=seed, extra_body=exact_length
        )
        if reply.usage.completion_tokens != max_tokens:
            sys.exit(f"the server generated {reply.usage.completion_tokens} tokens, not {max_tokens}")
        return time.perf_counter() - start

    return complete


def direct_calls(model_path: str, max_tokens: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """The same requests through `generate` in this process: one (returns its latency), and n as one batch (returns
    the batch's time)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = CALMForCausalLM.from_pretrained(model_path).eval()
    length = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens}

    def complete(seed: int) -> float:
        start = time.perf_counter()
        inputs = tokenizer(PROMPT, return_tensors="pt")
        torch.manual_seed(seed)
        tokenizer.decode(model.generate(**inputs, **length)[0], skip_special_tokens=True)
        return time.perf_counter() - start

    def complete_batch(n: int) -> float:
        start = time.perf_counter()
        inputs = tokenizer([PROMPT] * n, return_tensors="pt")
        tokenizer.batch_decode(model.generate(**inputs, **length), skip_special_tokens=True)
        return time.perf_counter() - start

    return complete, complete_batch


def measure(args: argparse.Namespace, url: str) -> dict[str, dict]:
    """`--rounds` interleaved rounds of every configuration; their latencies pooled, their wall times summed."""
    through_server = server_client(url, args.model, args.max_tokens)
    directly, as_a_batch = direct_calls(args.model, args.max_tokens)
    through_server(0), directly(0), as_a_batch(2)  # warm-up
    serving = {f"calm-serve, {c} concurrent client(s)": c for c in args.concurrency}
    one_by_one, batched = "generate, one request at a time", "generate, all requests as one batch"
    latencies = {name: [] for name in [*serving, one_by_one, batched]}
    walls = dict.fromkeys(latencies, 0.0)
    seeds = range(args.requests)
    for _ in range(args.rounds):
        for name, concurrency in serving.items():
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                latencies[name] += pool.map(through_server, seeds, timeout=ANSWER_SECONDS * args.requests)
            walls[name] += time.perf_counter() - start
        start = time.perf_counter()
        latencies[one_by_one] += [directly(seed) for seed in seeds]
        walls[one_by_one] += time.perf_counter() - start
        wall = as_a_batch(args.requests)
        latencies[batched] += [wall] * args.requests
        walls[batched] += wall
    return {name: summary(latencies[name], walls[name]) for name in latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a CALM folder (default: the shipped model)")
    parser.add_argument("--requests", type=int, default=24, help="requests per configuration and round (default: 24)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates (default: 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="clients at once (1 4 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (default: 1)")
    parser.add_argument("--output", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", Path(tempfile.gettempdir()) / f"calm-serve-{port}.log"
    process = start_server(args.model, port, args.threads, log)
    try:
        wait_for_health(url, process, log)
        results = measure(args, url)
    finally:
        process.terminate()  # its own PID
        process.wait(timeout=60)

    print(f"{args.rounds} rounds x {args.requests} requests of {args.max_tokens} new tokens, prompt {PROMPT!r}")
    print("| how | requests/s | median ms | p90 ms |\n|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['requests_per_s']:.2f} | {result['median_ms']:.0f} | {result['p90_ms']:.0f} |")
    if args.output:
        run = {key: getattr(args, key) for key in ("model", "requests", "max_tokens", "rounds", "threads")}
        machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        run.update(prompt=PROMPT, **machine, **versions, results=results)
        args.output.write_text(json.dumps(run, indent=2) + "\n")


if __name__ == "__main__":
    main()
