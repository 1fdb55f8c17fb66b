"""The benchmark script runs end to end (tiny shapes): every column, the same-tokens check, ratios and JSON.

It asserts nothing about speed: speed claims come from full runs of the script, not from tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_script_runs(tmp_path):
    output = tmp_path / "results.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/benchmark_generation.py",
            "--shape",
            "tiny",
            "--dtypes",
            "float32",
            "--batch-sizes",
            "1",
            "2",
            "--num-samples",
            "24",  # more than ShortlistArgmax's min_states: the shortlist is tried
            "--max-new-tokens",
            "8",
            "--repeats",
            "1",
            "--output",
            str(output),
            "--plot",
            "",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "same tokens as the authors' loop at T=1: True" in run.stdout
    result = json.loads(output.read_text())
    rows = {(r["model"], r["batch"], r["temperature"]) for r in result["results"]}
    for batch in (1, 2):
        assert {("llama", batch, None), ("calm", batch, 1.0), ("calm", batch, 0.5)} <= rows
        assert {("calm-full", batch, 0.5), ("authors", batch, 1.0), ("authors", batch, 0.5)} <= rows
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    assert any("T=1 calm / llama" in line for line in result["ratios"])
    pooled = [r for r in result["results"] if r["model"] == "calm" and r["temperature"] == 0.5]
    assert all(0.0 <= r["certified"] <= 1.0 for r in pooled)


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
