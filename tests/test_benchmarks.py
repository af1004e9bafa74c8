"""The benchmark scripts stay runnable: a tiny smoke run (numbers are printed, never asserted)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import build_tiny_model, run_cli


@pytest.mark.slow
def test_train_throughput_benchmark_runs_both_loops(tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli([
        sys.executable, "benchmarks/train_throughput.py", "--model_dir", str(tiny_model_dir),
        "--data", str(synthetic_train_csv), "--precision", "fp32", "--batch_size", "8", "--steps", "2",
        "--warmup", "1", "--rounds", "1", "--eval_rows", "16", "--work_dir", str(tmp_path / "work"),
        "--json_out", str(out), "--runners", "ours,ours_typed,trainer", "--dropout_generator", "pcg64",
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "| trainer |" in proc.stdout
    assert re.search(r"ours / trainer \(train samples/s\): [\d.]+x; MFU ours [\d.]+%, trainer [\d.]+%", proc.stdout)
    assert "| ours_typed |" in proc.stdout and "ours_typed / trainer" in proc.stdout
    rows = {row["runner"]: row for row in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        assert row["samples_s"] > 0 and 0 < row["pad_eff"] <= 1 and row["eval_samples_s"] > 0 and row["mfu"] > 0
    # the headline command got the generator, and its run_config.json records it
    typed_run = next((tmp_path / "work").glob("ours-typed-*"))
    assert json.loads((typed_run / "run_config.json").read_text())["dropout_generator"] == "pcg64"


@pytest.mark.slow
def test_step_time_benchmark_times_each_variant_in_its_own_process():
    proc = run_cli([sys.executable, "benchmarks/step_time.py", "--variants", "dropout,no_dropout", "--batch_size", "2",
                    "--seq_len", "8", "--steps", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| dropout", "| no_dropout"))]
    assert [r[1].strip() for r in rows] == ["dropout", "no_dropout"] and all(float(r[3]) > 0 for r in rows)
    bad = run_cli([sys.executable, "benchmarks/step_time.py", "--variants", "fast"])
    assert bad.returncode != 0 and "unknown variant 'fast'" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["torch", "pcg64"])
def test_profile_step_benchmark_splits_a_step_into_rows(generator, tiny_model_dir, synthetic_train_csv):
    proc = run_cli([sys.executable, "benchmarks/profile_step.py", "--model_dir", str(tiny_model_dir), "--data",
                    str(synthetic_train_csv), "--precision", "bf16", "--batch_size", "8", "--warmup", "1", "--steps", "2",
                    "--dropout_generator", generator], env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| row")}
    for row in ("matmuls (Linear: addmm/mm)", "dropout masks", "optimizer", "next batch (collation)", "**step**"):
        assert row in rows, proc.stdout[-2000:]
    step = float(rows.pop("**step**").strip("*"))
    # The rows add up to the step (each printed to 1 ms).
    assert step > 0 and sum(float(v) for v in rows.values()) == pytest.approx(step, abs=0.0005 * (len(rows) + 1))


@pytest.mark.slow
def test_gpu_check_runs_every_step_small_on_the_cpu(tiny_model_dir, synthetic_train_csv, tmp_path):
    """GPU_CHECK_SMOKE=1: the check's steps (GPU-marked tests, throughput at batch 32 and at the largest batch that
    fits, the proxy recipes) on the CPU with tiny models, ending in its one table."""
    six_layers = build_tiny_model(tmp_path / "bert6", arch="bert", num_layers=6)  # the proxy recipes' depth
    out = tmp_path / "check"
    proc = run_cli(["bash", "benchmarks/gpu_check.sh", str(out)], timeout=1200, env={
        "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "MODEL_DIR": str(tiny_model_dir),
        "MINILM_DIR": str(six_layers), "DATA": str(synthetic_train_csv)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "exit status" not in proc.stderr, proc.stderr
    # On a CPU the fp16 case is skipped (Accelerate has no fp16 autocast there); everything else runs.
    assert re.search(r"\| GPU-marked tests \(tests/test_gpu.py\) \| [1-9]\d* passed, 0 failed, 1 skipped \|", table), table
    for batch, runners in ((32, ("ours", "ours_compiled", "trainer", "trainer_compiled")), (64, ("ours", "trainer"))):
        for runner in runners:
            assert re.search(rf"\| throughput, batch {batch}, {runner} \| [\d.]+ samples/s, MFU", table), table
        assert re.search(rf"batch {batch}: our fastest / the Trainer at its best \| [\d.]+x", table), table
    for recipe in ("proxy-minilm", "proxy-fast"):
        assert re.search(rf"\| time to accuracy, {recipe} \| [\d.]+% validation accuracy in \d+ s", table), table
    assert (out / "table.md").read_text().strip() == table.strip()


def test_gpu_check_table_shows_a_failed_runner_beside_the_ones_that_ran(tmp_path, monkeypatch):
    """A runner that fails (out of memory at the big batch) is a table row saying so; the others keep their numbers."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # as when run as a script
    import gpu_check
    row = {"runner": "ours", "samples_s": 100.0, "mfu": 0.4, "peak_mem_gib": 3.0}
    (tmp_path / "throughput_b512.json").write_text(json.dumps({
        "args": {"batch_size": 512}, "rows": [row, {**row, "runner": "trainer", "samples_s": 50.0}],
        "failed": ["ours_compiled"]}))
    table = gpu_check.table(tmp_path, ["proxy-fast"])
    assert "| throughput, batch 512, ours | 100.0 samples/s, MFU 40.0%, peak 3.0 GiB, compile 0 s |" in table
    assert "| throughput, batch 512: our fastest / the Trainer at its best | 2.00x (ours vs trainer) |" in table
    assert "| throughput, batch 512, ours_compiled | failed (see throughput_b512.log) |" in table
    assert "| time to accuracy, proxy-fast | not finished (see proxy-fast.log) |" in table
