"""The benchmark script runs end to end (tiny shapes): its columns, ratios and JSON.

It asserts nothing about speed: speed claims come from full runs of the script, not from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT, require_torch_compile

pytestmark = pytest.mark.slow  # conversions, training runs or subprocesses: minutes

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path: Path, *args: str, ok: bool = True) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the script on `args` (tiny shapes, one repeat, 8 new tokens); return the process and its JSON."""
    output = tmp_path / "results.json"
    common = ["--shape", "tiny", "--repeats", "1", "--max-new-tokens", "8", "--output", str(output)]
    run = subprocess.run(
        [sys.executable, "benchmarks/benchmark_generation.py", *common, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    if not ok:
        return run, None
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(output.read_text())


def test_benchmark_script_runs(tmp_path):
    run, result = run_benchmark(tmp_path, "--batch-sizes", "1", "2", "--dtype", "float32")
    cases = {(r["batch_size"], r["temperature"]) for r in result["results"]}
    assert cases == {(1, 1.0), (2, 1.0), (1, 0.5), (2, 0.5)}
    for row in result["results"]:
        assert row["calm"]["new_tokens_per_s"] > 0 and row["llama"]["new_tokens_per_s"] > 0
        assert row["calm_vs_llama"] == row["calm"]["new_tokens_per_s"] / row["llama"]["new_tokens_per_s"]
        assert len(row["calm"]["seconds"]) == 1
    assert result["meta"]["torch"] == __import__("torch").__version__
    assert "calm tok/s" in run.stdout


def test_benchmark_refuses_bad_arguments(tmp_path):
    run, _ = run_benchmark(tmp_path, "--authors-code", str(tmp_path), ok=False)
    assert run.returncode == 2 and "--authors-code and --authors-python go together" in run.stderr
    if not __import__("torch").cuda.is_available():
        run, _ = run_benchmark(tmp_path, "--device", "cuda", ok=False)
        assert run.returncode == 2 and "sees no CUDA GPU; use --device cpu" in run.stderr


def test_benchmark_compiled_columns(tmp_path):
    """--compile adds the compiled backbones (static caches) beside the eager columns."""
    require_torch_compile()
    _, result = run_benchmark(tmp_path, "--batch-sizes", "1", "--temperatures", "1.0", "--compile")
    (row,) = result["results"]
    assert {"calm", "llama", "calm-compiled", "llama-compiled"} <= set(row)
    assert row["calm-compiled"]["new_tokens_per_s"] > 0 and "calm_vs_llama-compiled" in row


def test_gpu_checks_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_checks.sh, the GPU session's one command, run with DEVICE=cpu and tiny shapes: it imports the
    package from the checkout, runs the tests' CUDA cases (skipped here) and the benchmark with CUDA graphs' compile
    mode, and leaves its logs and JSON in the folder it is given."""
    require_torch_compile()
    out = tmp_path / "gpu"
    bench_args = "--shape tiny --repeats 1 --max-new-tokens 8 --batch-sizes 1 --temperatures 1.0"
    env = {**os.environ, "DEVICE": "cpu", "BENCH_ARGS": bench_args, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    environment = (out / "environment.txt").read_text()
    assert "calm_transformers from /" in environment and str(REPO) not in environment  # the checkout, via its link
    assert "skipped" in (out / "tests_cuda.log").read_text()
    (row,) = json.loads((out / "results_cpu_bf16.json").read_text())["results"]
    assert {"calm", "llama", "calm-compiled", "llama-compiled"} <= set(row)
