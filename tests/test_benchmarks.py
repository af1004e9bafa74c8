"""The benchmark scripts stay runnable: a tiny smoke run (numbers are printed, never asserted)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_train_throughput_benchmark_runs_both_loops(tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli([
        sys.executable, "benchmarks/train_throughput.py", "--model_dir", str(tiny_model_dir),
        "--data", str(synthetic_train_csv), "--precision", "fp32", "--batch_size", "8", "--steps", "2",
        "--warmup", "1", "--rounds", "1", "--eval_rows", "16", "--work_dir", str(tmp_path / "work"),
        "--json_out", str(out),
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "| trainer |" in proc.stdout and "ours / trainer" in proc.stdout
    rows = {row["runner"]: row for row in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        assert row["samples_s"] > 0 and 0 < row["pad_eff"] <= 1 and row["eval_samples_s"] > 0
