"""Threads per process and the precision `--mixed_precision auto` resolves to, with the hardware probes patched.

The as-typed run (plain `accelerate launch`, no config) is in test_train.py."""

from __future__ import annotations

import os

import pytest
import torch

from peft_agnews import hardware
from peft_agnews.hardware import auto_precision, cpu_bf16_flags, resolve_mixed_precision, resolve_num_threads

LAUNCH_VARS = ("OMP_NUM_THREADS", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID",
               "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


@pytest.fixture
def machine(monkeypatch):
    """A clean launch environment on a patched machine: 16 physical cores, no GPU, CPU bf16 as set per test."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hardware, "physical_cores", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_machine(cpu_bf16: bool = False, cuda: bool = False, cuda_bf16: bool = False):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)

    return set_machine


@pytest.mark.parametrize(
    ("cpu_bf16", "cuda", "cuda_bf16", "on_cpu", "expected"),
    [
        (False, True, True, False, "bf16"),  # Ampere and newer
        (False, True, False, False, "fp16"),  # V100, T4
        (True, True, False, True, "bf16"),  # a CPU run (e.g. accelerate_configs/cpu.yaml) on a GPU machine
        (True, False, False, True, "bf16"),  # AVX512-BF16 / AMX
        (False, False, False, True, "no"),  # AVX2 only: bf16 would be emulated, ~8x slower than fp32
    ],
)
def test_auto_precision_table(machine, cpu_bf16, cuda, cuda_bf16, on_cpu, expected):
    machine(cpu_bf16=cpu_bf16, cuda=cuda, cuda_bf16=cuda_bf16)
    assert auto_precision(on_cpu) == expected
    assert resolve_mixed_precision("auto", on_cpu) == expected


@pytest.mark.parametrize(
    ("requested", "launcher", "expected"),
    [
        ("auto", "no", "bf16"),  # what plain `accelerate launch` always exports: not a request for fp32
        ("auto", None, "bf16"),  # python -m / torchrun
        ("auto", "fp16", "fp16"),  # an Accelerate config or `accelerate launch --mixed_precision fp16`
        ("auto", "BF16", "bf16"),
        ("no", "bf16", "no"),  # the trainer's own flag wins over everything
        ("fp16", "no", "fp16"),
    ],
)
def test_launcher_precision_counts_only_when_it_is_half(machine, monkeypatch, requested, launcher, expected):
    machine(cpu_bf16=True)
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_mixed_precision(requested, on_cpu=True) == expected


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path):
    def cpuinfo(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return path

    assert cpu_bf16_flags(cpuinfo("fpu sse avx2 avx512f avx512_bf16")) == ["avx512_bf16"]
    assert cpu_bf16_flags(cpuinfo("fpu avx2 amx_tile amx_bf16 avx512_bf16")) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(cpuinfo("fpu sse avx2 avx512f avx512_vnni")) == []  # AVX-512 alone is not bf16
    assert cpu_bf16_flags(tmp_path / "absent") == []  # no /proc (macOS): fp32


@pytest.mark.parametrize(
    ("env", "requested", "expected"),
    [
        ({}, 0, (16, "physical cores / local processes")),  # python -m peft_agnews.train
        ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 0, (16, "physical cores / local processes")),
        ({"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}, 0,
         (4, "physical cores / local processes")),  # torchrun --nproc_per_node 4
        ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO", "LOCAL_WORLD_SIZE": "32"}, 0,
         (1, "physical cores / local processes")),  # never 0
        ({"OMP_NUM_THREADS": "1"}, 0, (1, "OMP_NUM_THREADS")),  # the user's own, no launcher
        ({"OMP_NUM_THREADS": "6", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 0, (6, "OMP_NUM_THREADS")),  # launch --num_cpu_threads_per_process 6
        ({"OMP_NUM_THREADS": "6", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 3, (3, "--num_threads")),
        ({"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}, 1, (1, "--num_threads")),
    ],
)
def test_thread_count(machine, monkeypatch, env, requested, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_num_threads(requested) == expected


def test_physical_cores_respect_the_cgroup_quota(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert hardware._cgroup_cpu_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert hardware._cgroup_cpu_quota(quota) is None
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: 1.5)
    assert hardware.physical_cores() == 1
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: None)
    assert 1 <= hardware.physical_cores() <= len(os.sched_getaffinity(0))


def test_evaluate_and_predict_take_the_thread_option():
    from peft_agnews.errors import UsageError
    from peft_agnews.loading import ModelArgs
    from peft_agnews.runtime import accelerator_session

    before = torch.get_num_threads()
    try:
        with accelerator_session(1):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert ModelArgs(adapter_dir="run/adapter", num_threads=3).num_threads == 3
    with pytest.raises(UsageError, match="--num_threads"):
        ModelArgs(adapter_dir="run/adapter", num_threads=-1)


@pytest.mark.parametrize(("env", "launched"), [
    ({}, False),  # python peft_agnews/train.py
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, True),  # accelerate launch, any config
    ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}, True),  # torchrun
    ({"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}, False),  # what a user may export alike
])
def test_launchers_are_told_apart_by_their_markers(machine, monkeypatch, env, launched):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hardware.under_launcher() is launched


@pytest.mark.parametrize(("env", "processes", "spans"), [
    ({}, 4, False),  # no launcher variable: one machine assumed
    ({"LOCAL_WORLD_SIZE": "4"}, 4, False),
    ({"LOCAL_WORLD_SIZE": "8"}, 16, True),  # 2 nodes x 8
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 4, True),
])
def test_a_run_spans_machines_when_its_launcher_puts_fewer_processes_here(machine, monkeypatch, env, processes, spans):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hardware.spans_machines(processes) is spans
