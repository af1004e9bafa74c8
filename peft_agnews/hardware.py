"""What the machine offers a run: CPU threads per process, and the precision `--mixed_precision auto` picks.

Launchers decide threads and precision for the scripts they start, and their defaults are wrong for this
trainer on a CPU: plain `accelerate launch` (no config, no GPU) exports OMP_NUM_THREADS=1 and
ACCELERATE_MIXED_PRECISION=no whatever the user asked for, and torchrun exports OMP_NUM_THREADS=1 for more
than one process. Both values are indistinguishable from a user's own, so under a launcher they are read as
"not asked"; `--num_threads N` / `--mixed_precision no` always win.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil
import torch

# Exported by `accelerate launch` (every launcher path) and by torchrun, never by a plain `python` start.
LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def under_launcher() -> bool:
    """True when `accelerate launch` or torchrun started this process (they export LAUNCHER_MARKERS)."""
    return any(marker in os.environ for marker in LAUNCHER_MARKERS)


def physical_cores() -> int:
    """Physical cores this process may use: hyperthreads do not add matmul throughput, and the CPU affinity mask
    and a cgroup CPU quota (containers, SLURM) can allow fewer than the machine has."""
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    # Affinity counts logical CPUs: scale it by the machine's physical/logical ratio.
    cores = min(physical, max(1, allowed * physical // logical))
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.floor(quota) if quota else cores))


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs allowed by a cgroup v2 quota ('max' or no file: none)."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Processes sharing this machine: torchrun and `accelerate launch` (multi-process) export LOCAL_WORLD_SIZE;
    MPI launchers their own variables; a single process has none."""
    return _launcher_local_processes() or 1


def spans_machines(num_processes: int) -> bool:
    """True when a run of `num_processes` processes has fewer of them on this machine, as its launcher says (when
    it says nothing, one machine is assumed)."""
    return num_processes > (_launcher_local_processes() or num_processes)


def _launcher_local_processes() -> int | None:
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return None


def resolve_num_threads(requested: int = 0) -> tuple[int, str]:
    """(threads per process, where the number came from).

    `requested` > 0 (--num_threads) wins; then OMP_NUM_THREADS, unless it is the 1 a launcher injects; else all
    physical cores divided among the local processes."""
    if requested > 0:
        return requested, "--num_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1 and not (omp == "1" and under_launcher()):
        return int(omp), "OMP_NUM_THREADS"
    return max(1, physical_cores() // local_processes()), "physical cores / local processes"


def apply_num_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads per `resolve_num_threads` and return the count."""
    threads, _ = resolve_num_threads(requested)
    torch.set_num_threads(threads)
    return threads


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Which of AVX512-BF16 / AMX-BF16 this CPU reports (none where /proc/cpuinfo is absent, e.g. macOS)."""
    try:
        with cpuinfo.open() as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return []
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions, so bf16 autocast runs at or above fp32 speed; without them
    PyTorch emulates bf16 matmuls, several times slower than fp32."""
    return bool(cpu_bf16_flags())


def auto_precision(on_cpu: bool) -> str:
    """What `--mixed_precision auto` picks for a run on the CPU (`on_cpu`) or on the accelerator: bf16 on GPUs
    that support it, fp16 on older GPUs, bf16 on CPUs with native bf16, else fp32 ('no')."""
    if on_cpu:
        return "bf16" if cpu_has_native_bf16() else "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # other accelerators (MPS, XPU, ...): fp32 until measured there


def resolve_mixed_precision(requested: str, on_cpu: bool) -> str:
    """The precision a run uses. An explicit `--mixed_precision` wins, then a launcher's or Accelerate config's
    fp16/bf16/fp8; a launcher's `no` is what plain `accelerate launch` always exports, so it falls to `auto`."""
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return launcher if launcher != "no" else auto_precision(on_cpu)
