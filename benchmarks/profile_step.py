"""Where one steady training step of our loop spends its time: a torch.profiler breakdown by kind of work.

    python benchmarks/profile_step.py --precision bf16
    python benchmarks/profile_step.py --precision fp32 --top_ops 20

Builds what `peft_agnews/train.py` builds (roberta-base shape with random init from benchmarks/train_throughput.py,
the reference LoRA, dropout kept, frozen weights cast under bf16, Accelerate's autocast, AdamW), feeds it real
AG News batches from our length-grouped loader, runs --warmup untimed steps, then times --steps steps phase by
phase (next batch, forward, backward, clip + health check, optimizer) and profiles the last one. The forward +
backward time is split into kinds of operator by the profiler's self time; what the profiler cannot attribute to
an operator (Python, autograd and dispatch between ops) is its own row. Prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Operator-name fragments -> row of the table, first match wins (names as torch.profiler reports aten ops).
KINDS = [
    # inductor's generated kernels (named for the ops they fuse, so matched first); profiled when compiling
    ("compiled fused kernels (inductor)", ("cpp_fused", "triton_")),
    ("attention (SDPA / bmm / softmax)", ("scaled_dot_product", "flash_attention", "bmm", "softmax", "baddbmm")),
    ("matmuls (Linear: addmm/mm)", ("addmm", "aten::mm", "linear", "matmul")),
    ("dropout masks", ("dropout", "bernoulli")),  # "dropout mask (pcg64)" is the pcg64 generator's own event
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dtype casts / copies", ("aten::to", "_to_copy", "copy_", "clone", "contiguous")),
    ("embedding", ("embedding",)),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("residual add / mul / other elementwise", ("add", "mul", "div", "sub", "where", "masked_fill", "fill_", "zero_",
                                                "sum", "mean", "rsub", "neg", "tanh", "ne", "cumsum")),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (phase medians); the last one is profiled")
    p.add_argument("--gradient_checkpointing", choices=["true", "false"], default="false")
    p.add_argument("--dropout_generator", choices=["torch", "pcg64"], default="pcg64")  # our default (TrainConfig)
    p.add_argument("--torch_compile", choices=["true", "false"], default="false",
                   help="compile as --torch_compile does (warm up with --warmup >= 3: the first steps compile)")
    p.add_argument("--half_precision_base", choices=["true", "false"], default="false",
                   help="the frozen base in bf16 without autocast (--precision bf16 only)")
    p.add_argument("--model_dir", default=None, help="an existing model folder (default: the roberta-base shape that "
                   "benchmarks/train_throughput.py builds)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "agnews" / "train_head10429.csv"))
    p.add_argument("--top_ops", type=int, default=0, help="also print the N operators with most self time")
    return p.parse_args(argv)


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "other operators"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import parse_args as throughput_args, prepare_model

    from peft_agnews import speed
    from peft_agnews.batching import make_dataloaders, tokenize_splits
    from peft_agnews.config import TrainConfig
    from peft_agnews.data import load_splits
    from peft_agnews.hardware import cpu_bf16_flags
    from peft_agnews.model import apply_lora, load_base_model, load_tokenizer, optimizer_param_groups

    model_dir = args.model_dir or prepare_model(throughput_args([]))
    cfg = TrainConfig(model_name_or_path=str(model_dir), train_file=args.data, gradient_accumulation_steps=1,
                      per_device_train_batch_size=args.batch_size, mixed_precision="no" if args.precision == "fp32"
                      else "bf16", gradient_checkpointing=args.gradient_checkpointing == "true", report_to="none",
                      dropout_generator=args.dropout_generator, torch_compile=args.torch_compile == "true",
                      half_precision_base=args.half_precision_base == "true")
    if cfg.torch_compile:  # name inductor's C++ kernels in the profile (else their time shows as dispatch)
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
    accelerator = Accelerator(cpu=True, mixed_precision="no" if cfg.half_precision_base else cfg.mixed_precision)
    tokenizer = load_tokenizer(cfg)
    loader = make_dataloaders(tokenize_splits(load_splits(cfg), tokenizer, cfg.max_length), tokenizer, cfg)["train"]
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), cfg)
    # The speed options as training applies them: --dropout_generator, the frozen weights' dtype, compilation.
    speed.apply(model, cfg, precision=cfg.mixed_precision)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    batches = iter(loader)
    phases = collections.defaultdict(list)

    def step(timed: bool, profiler=None) -> None:
        marks = [time.perf_counter()]
        batch = next(batches)
        marks.append(time.perf_counter())
        if profiler is not None:
            profiler.start()
        loss = model(**batch).loss
        marks.append(time.perf_counter())
        accelerator.backward(loss)
        if profiler is not None:
            profiler.stop()
        marks.append(time.perf_counter())
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        math.isfinite(float(loss.detach()) + float(norm))  # the loop's health check: one host sync per step
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(("next batch (collation)", "forward", "backward", "clip + health", "optimizer"),
                                  marks, marks[1:]):
                phases[name].append(b - a)
            phases["shape"].append(tuple(batch["input_ids"].shape))

    for _ in range(args.warmup):
        step(False)
    for _ in range(args.steps - 1):
        step(True)
    prof = profile(activities=[ProfilerActivity.CPU])
    step(True, prof)  # profiles forward + backward only; the other phases are timed by the clock

    fb_ops = collections.Counter()
    for event in prof.key_averages():
        fb_ops[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    prof_fb = phases["forward"][-1] + phases["backward"][-1]
    med = {k: statistics.median(v) for k, v in phases.items() if k != "shape"}
    fb = med["forward"] + med["backward"]
    step_s = sum(med.values())
    op_total = sum(fb_ops.values())
    threads = torch.get_num_threads()
    print(f"{args.precision}, batch {args.batch_size}, shapes {phases['shape']}, torch threads {threads}, "
          f"CPU bf16 flags {' '.join(cpu_bf16_flags()) or 'none'}, gradient checkpointing "
          f"{args.gradient_checkpointing}, dropout generator {args.dropout_generator}, torch.compile "
          f"{args.torch_compile}, half-precision base {args.half_precision_base}; median step "
          f"{step_s:.3f} s ({args.batch_size / step_s:.2f} samples/s) over {args.steps} steps after {args.warmup}\n")
    print("| row | s per step | share |\n|---|---|---|")
    rows = []
    # The profiled step's forward + backward wall time minus its operators' self time is time no operator
    # accounts for; both parts are scaled to the median (unprofiled) forward + backward time.
    unattributed = max(prof_fb - op_total, 0.0) * fb / prof_fb
    scale = (fb - unattributed) / op_total
    for kind, _ in KINDS + [("other operators", ())]:
        if fb_ops.get(kind):
            rows.append((kind, fb_ops[kind] * scale))
    rows.append(("Python / autograd / dispatch between ops", unattributed))
    rows += [(name, med[name]) for name in ("next batch (collation)", "clip + health", "optimizer")]
    for name, seconds in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {seconds:.3f} | {seconds / step_s:.1%} |")
    print(f"| **step** | **{step_s:.3f}** | 100% |")
    if args.top_ops:
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top_ops))


if __name__ == "__main__":
    main()
