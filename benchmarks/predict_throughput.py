"""Prediction throughput (rows/s) of an adapter on its base vs the same adapter merged into the base.

    python benchmarks/predict_throughput.py --adapter_dir outputs/minilm/adapter \\
        --input_file ../shared/data/agnews/train_head10429.csv --rows 400

Times the scoring path of `predict` (tokenize, length-sorted batches, forward) on the first --rows rows, best of
--repeats, after one warm-up pass. Model loading and file I/O are excluded. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from peft_agnews.export import main as export
from peft_agnews.loading import ModelArgs, load_classifier
from peft_agnews.scoring import score_texts
from peft_agnews.runtime import accelerator_session
from peft_agnews.predict import PredictArgs, read_unlabelled


def rows_per_second(args: ModelArgs, texts: list[str], repeats: int) -> tuple[float, torch.Tensor]:
    classifier = load_classifier(args)
    with accelerator_session() as accelerator:
        logits, _ = score_texts(classifier, texts[: args.per_device_eval_batch_size], None, accelerator, args)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            logits, _ = score_texts(classifier, texts, None, accelerator, args)
            best = min(best, time.perf_counter() - started)
    return len(texts) / best, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter_dir", required=True)
    parser.add_argument("--input_file", required=True, help="any file predict reads (labels are ignored)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=128)
    cli = parser.parse_args()

    _, texts = read_unlabelled(PredictArgs(input_file=cli.input_file, output_file="-"))
    texts = texts[: cli.rows]
    common = {"per_device_eval_batch_size": cli.batch_size, "max_length": cli.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        merged = export(["--adapter_dir", cli.adapter_dir, "--merge", "--output_dir", str(Path(tmp) / "merged")])
        adapter_rate, adapter_logits = rows_per_second(ModelArgs(adapter_dir=cli.adapter_dir, **common), texts, cli.repeats)
        merged_rate, merged_logits = rows_per_second(ModelArgs(model_name_or_path=str(merged), **common), texts, cli.repeats)
    print(
        f"\n{len(texts)} rows, batch {cli.batch_size}, max_length {cli.max_length}, torch threads "
        f"{torch.get_num_threads()}, best of {cli.repeats}\n"
        f"adapter: {adapter_rate:8.1f} rows/s\nmerged:  {merged_rate:8.1f} rows/s  ({merged_rate / adapter_rate:.2f}x)\n"
        f"max |logit difference| {(adapter_logits - merged_logits).abs().max().item():.2e}; "
        f"same predictions: {torch.equal(adapter_logits.argmax(-1), merged_logits.argmax(-1))}"
    )


if __name__ == "__main__":
    main()
