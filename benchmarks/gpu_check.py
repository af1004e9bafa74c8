"""Helpers of benchmarks/gpu_check.sh: the largest batch that fits, and the one table the check prints.

    python benchmarks/gpu_check.py max-batch --model_dir DIR [--device cuda] [--candidates 1024,512,256,128]
    python benchmarks/gpu_check.py table OUT_DIR

`table` reads what the check wrote into OUT_DIR: gpu_tests.xml (pytest's JUnit report of the GPU-marked tests),
throughput_*.json (benchmarks/train_throughput.py --json_out), and <recipe>/results.json of each time-to-accuracy
run; a step that failed or was cut off by its time limit shows as such instead of a number.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from train_throughput import fastest_against_anchor  # this script's folder: the one source of the comparison

REPO = Path(__file__).resolve().parents[1]


def max_batch(model_dir: str, device: str, candidates: list[int], seq_len: int) -> int:
    """The largest of `candidates` whose bf16 forward + backward of the reference LoRA model at `seq_len` tokens
    fits in the device's memory (0 when none does)."""
    import torch

    from peft_agnews.config import TrainConfig
    from peft_agnews.model import apply_lora, load_base_model

    cfg = TrainConfig(model_name_or_path=model_dir, gradient_checkpointing=False)
    model = apply_lora(load_base_model(cfg), cfg).to(device).train()
    vocab = model.config.vocab_size
    for batch in sorted(candidates, reverse=True):
        try:
            ids = torch.randint(4, vocab, (batch, seq_len), device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, 0] % 4).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return batch
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            del ids
            torch.cuda.empty_cache()
    return 0


def test_summary(report: Path) -> str:
    if not report.is_file():
        return "not run"
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"


def throughput_rows(out: Path) -> list[str]:
    rows = []
    for file in sorted(out.glob("throughput_*.json")):
        record = json.loads(file.read_text())
        batch = record["args"]["batch_size"]
        for row in record["rows"]:
            rows.append(f"| throughput, batch {batch}, {row['runner']} | {row['samples_s']:.1f} samples/s, MFU {row['mfu']:.1%}, "
                        f"peak {row['peak_mem_gib']:.1f} GiB, compile {row.get('compile_s', 0.0):.0f} s |")
        if pair := fastest_against_anchor(record["rows"]):
            best, anchor = pair
            rows.append(f"| throughput, batch {batch}: our fastest / the Trainer at its best | "
                        f"{best['samples_s'] / anchor['samples_s']:.2f}x ({best['runner']} vs {anchor['runner']}) |")
        for name in record.get("failed", []):
            rows.append(f"| throughput, batch {batch}, {name} | failed (see {file.stem}.log) |")
    return rows


def time_to_accuracy_rows(out: Path, recipes: list[str]) -> list[str]:
    rows = []
    for recipe in recipes:
        results = out / recipe / "results.json"
        if not results.is_file():
            rows.append(f"| time to accuracy, {recipe} | not finished (see {recipe}.log) |")
            continue
        r = json.loads(results.read_text())
        compiled = f", compile {r['compile_seconds']:.0f} s" if "compile_seconds" in r else ""
        rows.append(f"| time to accuracy, {recipe} | {r['best_eval_accuracy']:.2%} validation accuracy in "
                    f"{r['train_runtime']:.0f} s of training ({r['global_step']} steps, {r['mixed_precision']}"
                    f"{compiled}) |")
    return rows


def table(out: Path, recipes: list[str]) -> str:
    device = (out / "device.txt").read_text().strip() if (out / "device.txt").is_file() else "unknown device"
    lines = [f"GPU check on {device}", "", "| check | result |", "|---|---|",
             f"| GPU-marked tests (tests/test_gpu.py) | {test_summary(out / 'gpu_tests.xml')} |"]
    lines += throughput_rows(out) or ["| throughput | not run |"]
    lines += time_to_accuracy_rows(out, recipes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("max-batch")
    probe.add_argument("--model_dir", required=True)
    probe.add_argument("--device", default="cuda")
    probe.add_argument("--candidates", default="1024,512,256,128,64")
    probe.add_argument("--seq_len", type=int, default=128)
    show = commands.add_parser("table")
    show.add_argument("out", type=Path)
    show.add_argument("--recipes", default="proxy-minilm,proxy-fast")
    args = parser.parse_args(argv)
    if args.command == "max-batch":
        print(max_batch(args.model_dir, args.device, [int(c) for c in args.candidates.split(",")], args.seq_len))
    else:
        print(table(args.out, args.recipes.split(",")))


if __name__ == "__main__":
    sys.exit(main())
