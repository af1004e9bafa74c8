"""The Accelerator's set-up and teardown, the same for training and inference commands."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from peft_agnews.hardware import apply_num_threads


def distributed_on_cpu() -> bool:
    """A multi-process launch (torchrun, `accelerate launch` with a MULTI_GPU config) on a machine with no
    accelerator: without `cpu=True` it would run N unconnected single-process copies instead of one gloo group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


@contextmanager
def accelerator_session(num_threads: int = 0, **accelerator_kwargs: Any) -> Iterator[Accelerator]:
    """An Accelerator on `num_threads` CPU threads per process (0: see `hardware.resolve_num_threads`), torn down
    on exit so gloo process groups never abort at interpreter exit."""
    apply_num_threads(num_threads)
    # Accelerate keeps one process-wide state that refuses a second precision; a second run in the same
    # interpreter (a notebook, the tests) must start from scratch, as a launched process does.
    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=distributed_on_cpu(), **accelerator_kwargs)
    try:
        yield accelerator
    finally:
        # Release the wrapped model, optimizer and loaders before the process group goes away.
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
