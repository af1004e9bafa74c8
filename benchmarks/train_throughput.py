"""Training throughput: our Accelerate loop vs the HF Trainer + PEFT on identical model, data, batch and precision.

Each measurement runs in its own subprocess (so peak memory and launch time are per run), the runners alternate
round by round, and the table reports medians. Nothing here is asserted by tests; it prints numbers.

    python benchmarks/train_throughput.py                       # roberta-base shape (random init), bf16, CPU
    python benchmarks/train_throughput.py --precision fp32 --rounds 1
    python benchmarks/train_throughput.py --device cuda --batch_size 32 --precision bf16
    python benchmarks/train_throughput.py --precision auto --runners ours,ours_typed,trainer   # as users start them
    python benchmarks/train_throughput.py --runners ours,ours_compiled,ours_half,trainer,trainer_compiled

Runners: `ours` (our loop in-process, as `peft_agnews/train.py` builds it), `ours_compiled` (+ `--torch_compile`),
`ours_half` (+ `--half_precision_base`, bf16 only), `ours_half_compiled` (both), `ours_typed` (the headline command
in a subprocess), `trainer` (the HF Trainer + PEFT fed our exact batch order), `trainer_compiled` (the same with
TrainingArguments' own `torch_compile=True`), `trainer_padded` (every row padded to --max_length, random order: the
design report's setting). The summary compares our fastest runner with the Trainer at its best (the faster of
`trainer` and `trainer_compiled`). A compiled runner's warmup steps absorb its compilation; its seconds from launch
to the first step include it.

`ours_typed` starts our trainer the way the README does, `accelerate launch peft_agnews/train.py ...` with no
Accelerate config (so the launcher's OMP_NUM_THREADS=1 and mixed precision 'no' reach it), and `--precision auto`
leaves the trainer's precision to `--mixed_precision auto` (the Trainer gets what auto picks on this machine).
Its steady rate comes from the wall-clock time between the step-end timestamps the run writes to metrics.jsonl,
as the Trainer's comes from its step-end callback; the in-process `ours` reads our loop's own throughput meter.

Columns: train samples/s and real (non-pad) tokens/s over the steady steps (after --warmup steps), padding
efficiency (real / computed tokens), achieved model FLOP/s (4 x linear-layer params x real tokens: forward plus
activation gradients; recompute from gradient checkpointing not counted) and MFU against a bf16/fp32 matmul peak
measured in this run, peak memory, evaluation samples/s, and seconds from process launch to the first step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# Our runners: the TrainConfig options each adds to the reference recipe's.
OUR_RUNNERS = {
    "ours": {},
    "ours_compiled": {"torch_compile": True},
    "ours_half": {"half_precision_base": True},
    "ours_half_compiled": {"torch_compile": True, "half_precision_base": True},
}
RUNNERS = (*OUR_RUNNERS, "ours_typed", "trainer", "trainer_compiled", "trainer_padded")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "auto"], default="bf16",
                   help="auto: what our --mixed_precision auto picks on this machine (the Trainer is given the same)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of all runners (median reported)")
    p.add_argument("--eval_rows", type=int, default=256)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--gradient_checkpointing", choices=["true", "false"], default="false")
    p.add_argument("--dropout_generator", choices=["torch", "pcg64"], default="pcg64",
                   help="our runners' --dropout_generator; the Trainer always draws torch's masks (same rates, same "
                        "Bernoulli distribution)")
    p.add_argument("--runners", default="ours,trainer",
                   help="comma list of: " + ", ".join(RUNNERS) + " (see the module docstring)")
    p.add_argument("--model_config", default=str(SHARED / "roberta-base-tokenizer"),
                   help="folder with config.json + tokenizer; a random-init model of that shape is built")
    p.add_argument("--model_dir", default=None, help="an existing model folder (skips building from --model_config)")
    p.add_argument("--data", default=str(SHARED / "agnews" / "train_head10429.csv"))
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "peft-agnews-bench"))
    p.add_argument("--json_out", default=None, help="also write the rows as JSON here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- shared set-up
def prepare_model(args) -> Path:
    """A random-init model of the config's shape, saved once with its tokenizer (both runners load this)."""
    if args.model_dir:
        return Path(args.model_dir)
    out = Path(args.work_dir) / ("model-" + Path(args.model_config).name)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model_config, num_labels=4)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(args.model_config).save_pretrained(out)
    return out


def matmul_peak(device: str, precision: str, seconds: float = 2.0) -> float:
    """Measured FLOP/s of 2048x2048 matmuls (through F.linear, the op Linear layers use) in the run's compute
    dtype, over about `seconds`: bounded in time because some CPUs emulate bf16 at a few GFLOP/s."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    torch.nn.functional.linear(a, b)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.nn.functional.linear(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        calls += 1
    return 2 * 2048**3 * calls / (time.perf_counter() - started)


def linear_params(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    return c.num_hidden_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def steady_rates(step_times: list[float], step_samples: list[int], step_tokens: list[int], warmup: int):
    t = sum(step_times[warmup:])
    return sum(step_samples[warmup:]) / t, sum(step_tokens[warmup:]) / t


# ----------------------------------------------------------------------------------------------- runners
def run_ours(args, model_dir: Path, launched: float, options: dict) -> dict:
    from peft_agnews.config import TrainConfig
    from peft_agnews.train import run

    out = Path(args.work_dir) / f"ours-{os.getpid()}"
    cfg = TrainConfig(
        model_name_or_path=str(model_dir), train_file=args.data, output_dir=str(out), overwrite_output_dir=True,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, gradient_accumulation_steps=1,
        max_train_steps=args.warmup + args.steps, max_eval_samples=args.eval_rows, max_length=args.max_length,
        logging_steps=1, eval_steps=10**9, save_steps=0, report_to="none",
        mixed_precision="no" if args.precision == "fp32" else args.precision,
        gradient_checkpointing=args.gradient_checkpointing == "true", dropout_generator=args.dropout_generator,
        **options,
    )
    results = run(cfg)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/samples_per_second" in e]
    times = [args.batch_size / e["train/samples_per_second"] for e in train]
    tokens = [e["train/tokens_per_second"] * t for e, t in zip(train, times)]
    samples_s, tokens_s = steady_rates(times, [args.batch_size] * len(times), tokens, args.warmup)
    eval_event = next(e for e in events if "eval/samples_per_second" in e)
    return {
        "samples_s": samples_s, "tokens_s": tokens_s, "pad_eff": padding_efficiency(cfg, len(train)),
        "eval_samples_s": eval_event["eval/samples_per_second"], "first_step_s": train[0]["time"] - launched,
        "compile_s": results.get("compile_seconds", 0.0),
    }


def padding_efficiency(cfg, steps: int) -> float:
    """Real / computed tokens of the first `steps` batches our loop trains on (same sampler, same collator)."""
    from peft_agnews.batching import make_dataloaders, tokenize_splits
    from peft_agnews.data import load_splits
    from peft_agnews.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    loader = make_dataloaders(tokenize_splits(load_splits(cfg), tokenizer, cfg.max_length), tokenizer, cfg)["train"]
    real = padded = 0
    for i, batch in enumerate(loader):
        if i == steps:
            break
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    return real / padded


def run_ours_typed(args, model_dir: Path, launched: float) -> dict:
    """The headline command as typed, in its own process tree; rates from its step-end timestamps."""
    from peft_agnews.config import TrainConfig

    out = Path(args.work_dir) / f"ours-typed-{os.getpid()}"
    options = {
        "model_name_or_path": model_dir, "train_file": args.data, "output_dir": out, "overwrite_output_dir": "true",
        "per_device_train_batch_size": args.batch_size, "per_device_eval_batch_size": 64,
        "gradient_accumulation_steps": 1, "max_train_steps": args.warmup + args.steps,
        "max_eval_samples": args.eval_rows, "max_length": args.max_length, "logging_steps": 1, "eval_steps": 10**9,
        "save_steps": 0, "report_to": "none", "gradient_checkpointing": args.gradient_checkpointing,
        "dropout_generator": args.dropout_generator,
    }
    if args.typed_precision != "auto":
        options["mixed_precision"] = "no" if args.precision == "fp32" else args.precision
    argv = [part for key, value in options.items() for part in (f"--{key}", str(value))]
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "peft_agnews/train.py", *argv], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/samples_per_second" in e]
    # Step i's time is the gap between step ends i-1 and i; step 1 (no earlier end) is always in the warmup.
    times = [b["time"] - a["time"] for a, b in zip(train, train[1:])]
    tokens = [e["train/tokens_per_second"] * e_time for e, e_time in
              zip(train[1:], (args.batch_size / e["train/samples_per_second"] for e in train[1:]))]
    samples_s, tokens_s = steady_rates(times, [args.batch_size] * len(times), tokens, args.warmup - 1)
    results = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "run_config.json").read_text())
    ran = TrainConfig(**{f.name: saved[f.name] for f in dataclasses.fields(TrainConfig)})  # the run's own config
    plan = saved["plan"]
    eval_event = next(e for e in events if "eval/samples_per_second" in e)
    return {
        "samples_s": samples_s, "tokens_s": tokens_s, "pad_eff": padding_efficiency(ran, len(train)),
        "eval_samples_s": eval_event["eval/samples_per_second"], "first_step_s": train[0]["time"] - launched,
        "precision": results["mixed_precision"], "threads": plan["num_threads"],
        "peak_mem_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def run_trainer(args, model_dir: Path, launched: float, pad_to_max: bool, compiled: bool = False) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from peft_agnews.batching import LengthGroupedSampler
    from peft_agnews.config import TrainConfig
    from peft_agnews.data import load_splits
    from peft_agnews.model import lora_config

    cfg = TrainConfig(train_file=args.data, max_eval_samples=args.eval_rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_splits(cfg)  # identical rows and split to ours

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=args.max_length,
                        padding="max_length" if pad_to_max else False)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    data = splits.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    counts = {"real": [], "padded": []}

    def counting_collator(features):
        batch = collate([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])
        counts["real"].append(int(batch["attention_mask"].sum()))
        counts["padded"].append(batch["attention_mask"].numel())
        return batch

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, *a, **k):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            if len(self.marks) == 2:
                self.first_step_wall = time.time()

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=4)
    model = get_peft_model(base, lora_config(cfg, int(cfg.lora_r), base.config.num_hidden_layers))  # the reference LoRA
    training_args = TrainingArguments(
        output_dir=str(Path(args.work_dir) / f"trainer-{os.getpid()}"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, max_steps=args.warmup + args.steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        gradient_checkpointing=args.gradient_checkpointing == "true",
        train_sampling_strategy="random" if pad_to_max else "group_by_length",
        logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to="none", seed=cfg.seed,
        use_cpu=args.device == "cpu", remove_unused_columns=False, dataloader_num_workers=0,
        torch_compile=compiled,
    )
    class SameBatchesTrainer(Trainer):
        """The Trainer fed our loop's exact batch order, so both runners compute on identical batches."""

        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(list(data["train"]["length"]), args.batch_size, seed=cfg.seed)

    from peft_agnews.speed.compilation import CompileStats

    compiling = CompileStats.start()
    timer = StepTimes()
    trainer_class = Trainer if pad_to_max else SameBatchesTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=data["train"],
                            eval_dataset=data["validation"], data_collator=counting_collator, callbacks=[timer])
    trainer.train()
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    # The Trainer's loader collates one batch ahead: count only the batches that were trained on.
    real, padded = counts["real"][: len(times)], counts["padded"][: len(times)]
    samples_s, tokens_s = steady_rates(times, [args.batch_size] * len(times), real, args.warmup)
    pad_eff = sum(real) / sum(padded)
    evaluation = trainer.evaluate()
    return {
        "samples_s": samples_s, "tokens_s": tokens_s, "pad_eff": pad_eff,
        "eval_samples_s": evaluation["eval_samples_per_second"], "first_step_s": timer.first_step_wall - launched,
        "compile_s": compiling.report()["compile_seconds"],
    }


def child(args) -> None:
    launched = float(os.environ["BENCH_LAUNCHED"])
    model_dir = Path(os.environ["BENCH_MODEL_DIR"])
    if args._child in OUR_RUNNERS:
        row = run_ours(args, model_dir, launched, OUR_RUNNERS[args._child])
    elif args._child == "ours_typed":
        row = run_ours_typed(args, model_dir, launched)
    else:
        row = run_trainer(args, model_dir, launched, pad_to_max=args._child == "trainer_padded",
                          compiled=args._child == "trainer_compiled")
    import torch

    from peft_agnews.hardware import cpu_bf16_flags

    row["cpu_bf16_flags"] = " ".join(cpu_bf16_flags()) or "none"
    row.setdefault("peak_mem_gib", peak_memory_gib(args.device))
    row.setdefault("threads", torch.get_num_threads())
    row.setdefault("precision", args.precision)
    print("BENCH_ROW " + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    args = parse_args(argv)
    args.typed_precision = args.precision  # ours_typed passes no --mixed_precision for auto, as a user would
    if args.precision == "auto":
        from peft_agnews.hardware import auto_precision

        # Every other runner is given what auto picks here; ours_typed records what it resolved itself.
        picked = auto_precision(on_cpu=args.device == "cpu")
        args.precision = "fp32" if picked == "no" else picked
    if args._child:
        return child(args)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args)
    peak = matmul_peak(args.device, args.precision)
    n_linear = linear_params(model_dir)
    runners = args.runners.split(",")
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown:
        sys.exit(f"error: unknown runner(s) {unknown}; choose from {', '.join(RUNNERS)}")
    results: dict[str, list[dict]] = {r: [] for r in runners}
    failed: list[str] = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for round_index in range(args.rounds):
        for runner in runners:
            if runner in failed:
                continue
            env = {**os.environ, "BENCH_LAUNCHED": repr(time.time()), "BENCH_MODEL_DIR": str(model_dir),
                   "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--_child", runner], env=env,
                                  capture_output=True, text=True, cwd=REPO)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROW ")), None)
            if proc.returncode != 0 or line is None:
                # One runner failing (out of memory at a big batch, a compiler error) leaves the others' numbers.
                print(f"error: {runner} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                failed.append(runner)
                continue
            results[runner].append(json.loads(line[len("BENCH_ROW "):]))
            print(f"round {round_index + 1}/{args.rounds} {runner}: {results[runner][-1]['samples_s']:.2f} samples/s",
                  file=sys.stderr, flush=True)
            if args.json_out:  # after every run, so a check cut off by its time limit keeps what it measured
                write_json(args, peak, summarise(results, n_linear, peak), failed)

    rows = summarise(results, n_linear, peak)
    if not rows:
        sys.exit(f"error: every runner failed ({', '.join(failed)})")
    print(f"\n{args.device}, {args.precision}, batch {args.batch_size}, gradient checkpointing "
          f"{args.gradient_checkpointing}, our dropout generator {args.dropout_generator} (trainer: torch), {args.steps} timed steps after {args.warmup}, median of {args.rounds} "
          f"round(s); matmul peak {peak / 1e12:.3f} TFLOP/s ({args.precision}); model {model_dir.name}\n")
    header = ("| runner | train samples/s | real tokens/s | padding eff. | TFLOP/s | MFU | peak mem GiB | eval samples/s "
              "| launch to 1st step s | compile s |")
    print(header + "\n|" + "---|" * 10)
    for r in rows:
        print(f"| {r['runner']} | {r['samples_s']:.2f} | {r['tokens_s']:.0f} | {r['pad_eff']:.2f} | {r['tflops']:.3f} | "
              f"{r['mfu']:.1%} | {r['peak_mem_gib']:.2f} | {r['eval_samples_s']:.1f} | {r['first_step_s']:.1f} | "
              f"{r.get('compile_s', 0.0):.1f} |")
    print("\n" + "; ".join(f"{r['runner']}: {r['threads']:.0f} thread(s), {r['precision']}" for r in rows)
          + f"; CPU bf16 flags: {rows[0]['cpu_bf16_flags']}")
    by = {r["runner"]: r for r in rows}
    if "ours" in by and "trainer" in by:
        print(f"\nours / trainer (train samples/s): {by['ours']['samples_s'] / by['trainer']['samples_s']:.2f}x; "
              f"MFU ours {by['ours']['mfu']:.1%}, trainer {by['trainer']['mfu']:.1%}")
    if pair := fastest_against_anchor(rows):
        best, anchor = pair
        print(f"our fastest ({best['runner']}) / the Trainer at its best ({anchor['runner']}) (train samples/s): "
              f"{best['samples_s'] / anchor['samples_s']:.2f}x; MFU {best['mfu']:.1%} vs {anchor['mfu']:.1%}")
    for a, b in (("ours_typed", "trainer"), ("ours_typed", "ours")):
        if a in by and b in by:
            print(f"{a} / {b} (train samples/s): {by[a]['samples_s'] / by[b]['samples_s']:.2f}x")
    if args.json_out:
        write_json(args, peak, rows, failed)
    if failed:
        sys.exit(f"error: runner(s) {', '.join(failed)} failed (their output is above)")


def fastest_against_anchor(rows: list[dict]) -> tuple[dict, dict] | None:
    """(our fastest in-process runner, the Trainer at its best: the faster of its eager and compiled runs), or None
    when either side has no row."""
    ours = [r for r in rows if r["runner"] in OUR_RUNNERS]
    theirs = [r for r in rows if r["runner"] in ("trainer", "trainer_compiled")]
    if not ours or not theirs:
        return None
    return max(ours, key=lambda r: r["samples_s"]), max(theirs, key=lambda r: r["samples_s"])


def summarise(results: dict[str, list[dict]], n_linear: int, peak: float) -> list[dict]:
    """One row per runner that ran: the median of its rounds, with TFLOP/s and MFU from its real tokens/s."""
    rows = []
    for runner, runs in results.items():
        if not runs:
            continue
        med = {k: runs[0][k] if isinstance(runs[0][k], str) else statistics.median(r[k] for r in runs) for k in runs[0]}
        flops = med["tokens_s"] * 4 * n_linear
        rows.append({"runner": runner, **med, "tflops": flops / 1e12, "mfu": flops / peak})
    return rows


def write_json(args: argparse.Namespace, peak: float, rows: list[dict], failed: list[str]) -> None:
    Path(args.json_out).write_text(json.dumps({"args": vars(args), "peak_flops": peak, "rows": rows,
                                               "failed": failed}, indent=2))


if __name__ == "__main__":
    main()
