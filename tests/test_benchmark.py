"""The benchmark script runs end to end (tiny shapes): every column, the same-tokens check, ratios and JSON.

It asserts nothing about speed: speed claims come from full runs of the script, not from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import require_torch_compile

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run the script on `args` (tiny shapes, one repeat, no plot); return its stdout and its JSON."""
    output = tmp_path / "results.json"
    common = ["--shape", "tiny", "--repeats", "1", "--output", str(output), "--plot", ""]
    run = subprocess.run(
        [sys.executable, "benchmarks/benchmark_generation.py", *common, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads(output.read_text())


def test_benchmark_script_runs(tmp_path):
    stdout, result = run_benchmark(
        tmp_path,
        *("--dtypes", "float32", "--batch-sizes", "1", "2", "--max-new-tokens", "8"),
        *("--num-samples", "24"),  # more than ShortlistArgmax's min_states: the shortlist is tried
    )
    assert "same tokens as the authors' loop at T=1: True" in stdout
    rows = {(r["model"], r["batch"], r["temperature"]) for r in result["results"]}
    for batch in (1, 2):
        assert {("llama", batch, None), ("calm", batch, 1.0), ("calm", batch, 0.5)} <= rows
        assert {("calm-full", batch, 0.5), ("authors", batch, 1.0), ("authors", batch, 0.5)} <= rows
    assert all(r["tokens_per_s"] > 0 and r["floor_ms_per_step"] > 0 for r in result["results"])
    assert "# read bandwidth" in stdout
    assert any("T=1 calm / llama" in line for line in result["ratios"])
    assert sum("T=0.5 memory added vs T=1 (calm)" in line for line in result["ratios"]) == 2  # batch 1 and 2
    pooled = [r for r in result["results"] if r["model"] == "calm" and r["temperature"] == 0.5]
    assert all(0.0 <= r["certified"] <= 1.0 for r in pooled)


def test_step_weight_bytes_counts_what_a_step_reads():
    """The floor's bytes: every weight a step multiplies by, once (tied ones too), none it only looks rows up in."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from benchmark_generation import build_models, step_weight_bytes

    calm, llama = build_models("tiny", torch.float32, "cpu")
    counted = step_weight_bytes(calm, llama)

    def size(module):
        return sum(p.numel() * 4 for p in module.parameters())

    assert counted["llama"] == size(llama) - size(llama.model.embed_tokens)  # lm_head is not tied in the baseline
    encoder = calm.ae_model.encoder  # unused but for its embedding, the decoder's projection
    unused = size(calm.transformer.embed_tokens) + size(encoder) - size(encoder.embed_tokens)
    assert counted["calm"] == size(calm) - unused
    llama.lm_head.weight = llama.model.embed_tokens.weight  # tied: read once, as the projection
    assert step_weight_bytes(calm, llama)["llama"] == size(llama.model)


def test_step_breakdown_script_runs():
    run = subprocess.run(
        [sys.executable, "benchmarks/step_breakdown.py", "--shape", "tiny", "--dtype", "float32", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for batch in (1, 8):
        assert f"batch {batch}, median of 1" in run.stdout
    timed = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    assert len(timed) == 2 * 12 and all(float(line.split()[-1]) > 0 for line in timed)


def test_benchmark_compiled_columns(tmp_path):
    """--compile adds the compiled backbones (static caches) beside the eager columns, with their ratios."""
    require_torch_compile()
    _, result = run_benchmark(
        tmp_path,
        *("--dtypes", "float32", "--batch-sizes", "1", "--temperatures", "1.0", "--max-new-tokens", "8"),
        *("--compile", "--skip", "authors"),
    )
    rows = {(r["model"], r["temperature"]): r for r in result["results"]}
    assert set(rows) == {("llama", None), ("calm", 1.0), ("llama-compiled", None), ("calm-compiled", 1.0)}
    assert result["meta"]["compiled_backbones"] == "default"
    assert all(r["tokens_per_s"] > 0 and r["warm_up_s"] > 0 for r in rows.values())
    for label in ("T=1 calm-compiled / llama-compiled", "T=1 calm-compiled / calm", "llama-compiled / llama"):
        assert any(label in line for line in result["ratios"]), label


def test_gpu_checks_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_checks.sh, the GPU session's one command, run with DEVICE=cpu and tiny shapes: it imports the
    package from the checkout, runs the tests' CUDA cases (skipped here) and the benchmark with CUDA graphs' compile
    mode, and leaves its logs and JSON in the folder it is given."""
    require_torch_compile()
    out = tmp_path / "gpu"
    bench_args = "--shape tiny --repeats 1 --max-new-tokens 8 --batch-sizes 1 --temperatures 1.0 --skip authors"
    env = {**os.environ, "DEVICE": "cpu", "BENCH_ARGS": bench_args, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    environment = (out / "environment.txt").read_text()
    assert "calm_transformers from /" in environment and str(REPO) not in environment  # the checkout, via its link
    assert "skipped" in (out / "tests_cuda.log").read_text()
    result = json.loads((out / "results_cpu_bf16.json").read_text())
    assert result["meta"]["compiled_backbones"] == "reduce-overhead" and result["meta"]["device"] == "cpu"
    assert {r["model"] for r in result["results"]} == {"llama", "calm", "llama-compiled", "calm-compiled"}
