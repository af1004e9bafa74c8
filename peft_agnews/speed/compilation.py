"""`--torch_compile`: the encoder's layers compiled with torch.compile (inductor), and what compiling cost.

Regional compilation, as Accelerate's `compile_regions` and PyTorch's regional-compilation recipe do it: each layer of
the encoder's layer stack is compiled in place (`nn.Module.compile`), so the twelve layers of a roberta share one
compiled graph per kind of call (training, no_grad, inference, a new shape) and a cold compile takes seconds, not
minutes. In place, because that keeps every parameter name (the adapter and checkpoints are those of the plain
model), every hook and every per-instance forward (the frozen prefix, the first-token last layer) as they are; the
embeddings, the head and the frozen-prefix cache stay eager around the compiled layers. Sequence lengths vary per
batch: after the second length dynamo compiles a graph with a symbolic length, so a run compiles a handful of
graphs, which `CompileStats` counts and times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peft_agnews.speed.frozen_prefix import encoder_layer_list

# dynamo's timers for a frame's compile (tracing, AOT autograd, inductor) and for a backward graph compiled lazily
# at its first use; together they are the time spent compiling.
COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def compile_layers(model: torch.nn.Module, mode: str | None) -> int:
    """Compile each encoder layer of `model` in place (the whole model where it has no BERT-style layer stack);
    returns how many modules were set to compile. Numerics match eager within float reassociation; with dropout the
    random stream differs (inductor draws its own random numbers for the masks' seeds)."""
    options = {"mode": mode} if mode and mode != "default" else {}
    layers = encoder_layer_list(model)
    # The modules themselves: a frozen prefix's layer list iterates as one prefix step plus the trained layers.
    modules = list(layers._modules.values()) if layers is not None else [model]
    for module in modules:
        module.compile(**options)
    return len(modules)


def cpu_compiler_problem() -> str | None:
    """Why inductor cannot build CPU kernels here (no C++ compiler it accepts), or None when it can."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # when asked: importing inductor takes a while

    try:
        get_cpp_compiler()
    except Exception as err:  # inductor raises its own InvalidCxxCompiler, or OSError from the search
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


@dataclass
class CompileStats:
    """Graphs compiled and seconds spent compiling since `start()` (dynamo's counters are process-wide)."""

    graphs_at_start: int = 0
    seconds_at_start: float = 0.0

    @staticmethod
    def _now() -> tuple[int, float]:
        import torch._dynamo.utils as dynamo_utils  # when asked: importing dynamo takes a while

        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        seconds = sum(sum(dynamo_utils.compilation_time_metrics.get(name, [])) for name in COMPILE_TIMERS)
        return graphs, seconds

    @classmethod
    def start(cls) -> CompileStats:
        return cls(*cls._now())

    def report(self) -> dict[str, float]:
        """{"compiled_graphs": graphs compiled since start, "compile_seconds": their compile time}."""
        graphs, seconds = self._now()
        return {"compiled_graphs": graphs - self.graphs_at_start, "compile_seconds": seconds - self.seconds_at_start}
