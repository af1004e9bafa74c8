"""The training loop's state and guards: counters and best weights (`TrainState`), the position in an epoch
(`epoch_batches`), stop signals (`StopSignal`, `stop_when_launcher_dies`) and the non-finite check (`step_health`).

`TrainState` is what a checkpoint's trainer_state.json and adapter (or best.safetensors) hold (see checkpointing.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator

from peft_agnews.errors import NonFiniteError
from peft_agnews.hardware import under_launcher

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Where a checkpoint keeps `TrainState.best_weights` (see checkpointing.py).
BEST_FILE = "best.safetensors"


def epoch_batches(accelerator: Accelerator, loader: Any, skip: int) -> Iterable:
    """The current epoch's batches from position `skip` on (0: the whole epoch).

    Starting a DataLoader iterator draws a base seed from the global torch RNG. An uninterrupted run drew it at the
    start of the epoch, before the checkpoint captured the RNG state, so the resumed run must not draw again.
    """
    return loader if skip == 0 else _without_rng_draw(accelerator.skip_first_batches(loader, skip))


def _without_rng_draw(loader: Iterable) -> Iterator:
    with torch.random.fork_rng(devices=[]):
        iterator = iter(loader)
        first = next(iterator, None)  # the seed is drawn lazily, on the first batch
    if first is None:
        return
    yield first
    yield from iterator


class StopSignal:
    """SIGTERM / SIGINT set a flag instead of killing the process; the loop checks it at optimizer-step boundaries.

    Use as a context manager around the loop; the previous handlers come back on exit. To stop at once, SIGKILL.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name


def stop_when_launcher_dies() -> None:
    """Under `accelerate launch` or torchrun, receive SIGTERM when the launcher process dies (Linux).

    A one-process `accelerate launch` does not pass SIGTERM on: killed, it leaves the trainer running as an
    orphan; killed with SIGKILL, a multi-process launcher leaves every rank running. With the parent-death
    signal the trainer stops as on any SIGTERM: checkpoint, exit 75.
    """
    if not under_launcher() or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def step_health(accelerator: Accelerator, model: torch.nn.Module, loss_sum: torch.Tensor,
                grad_norm: torch.Tensor | None, stop: StopSignal) -> tuple[bool, bool, bool]:
    """(loss finite, gradients finite, stop requested), agreed by all processes in one small all-reduce.

    Called once per optimizer step, before `optimizer.step()`; `loss_sum` is the loss summed since the last log.
    """
    if grad_norm is None:
        grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).norm() if grads else torch.zeros((), device=accelerator.device)
    flags = torch.stack([
        (~torch.isfinite(loss_sum)).float(),
        (~torch.isfinite(torch.as_tensor(grad_norm, device=accelerator.device))).float(),
        torch.tensor(float(stop.received is not None), device=accelerator.device),
    ])
    flags = accelerator.reduce(flags, "sum").tolist()
    return flags[0] == 0, flags[1] == 0, flags[2] > 0


def nonfinite_error(what: str, step: int, last_checkpoint: Path | None, best_step: int) -> NonFiniteError:
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return NonFiniteError(
        f"non-finite {what} at optimizer step {step}: training stopped before applying it; {where} "
        f"(best adapter so far: step {best_step}, kept by the checkpoints: step_{best_step} when saved at that "
        f"step, else the last one's {BEST_FILE}); "
        "lower --learning_rate or check the data, then start again"
    )


@dataclass
class TrainState:
    """Loop counters; all but best_weights and samples_seen go into checkpoints (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in `epoch`: where a resumed run continues
    best_accuracy: float = -1.0  # validation accuracy at best_step
    best_step: int = 0
    best_metric: float | None = None  # validation --metric_for_best_model at best_step; None before any evaluation
    evals_without_improvement: int = 0
    skipped_steps: int = 0  # fp16 grad-scaler overflow steps
    early_stopped: bool = False
    tracker_run_id: str | None = None  # W&B's
    mlflow_run_id: str | None = None
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT's names (checkpointing.adapter_weights)
    # Validation (logits, labels) of the best step, in `eval_order`: for the misclassified-examples table.
    best_predictions: tuple[torch.Tensor, torch.Tensor] | None = None
    samples_seen: int = 0  # this session only, for throughput

    def counters(self) -> dict:
        excluded = ("best_weights", "best_predictions", "samples_seen")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in excluded}

    @classmethod
    def restore(cls, counters: dict, best_weights: dict[str, torch.Tensor]) -> TrainState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in counters.items() if k in known}, best_weights=best_weights)
        if "best_metric" not in counters and state.best_step:  # written before --metric_for_best_model: accuracy
            state.best_metric = state.best_accuracy
        return state

    def record_evaluation(self, step: int, value: float, accuracy: float, greater_is_better: bool) -> bool:
        """Count one evaluation whose --metric_for_best_model is `value`; True (and the best step, metric and
        accuracy updated) when it is strictly better than the best so far, as the Trainer compares."""
        improved = self.best_metric is None or (value > self.best_metric if greater_is_better else value < self.best_metric)
        if improved:
            self.best_metric, self.best_accuracy, self.best_step = value, accuracy, step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return improved
