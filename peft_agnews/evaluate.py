"""Score a trained classifier (adapter or merged model) on a labelled file: metrics as JSON, a table, a PNG.

    accelerate launch peft_agnews/evaluate.py --adapter_dir outputs/agnews-lora/adapter --test_file test.csv
    python -m peft_agnews.evaluate ...        peft-agnews evaluate ...

Runs on any number of processes; every example is counted exactly once. A multi-label classifier is scored on
class sets (a list per row, or names/ids joined by --label_separator): micro/macro-F1, subset accuracy, per class.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from peft_agnews.cli import parse_args
from peft_agnews.console import log_level
from peft_agnews.data import read_labelled_file
from peft_agnews.labels import multi_hot
from peft_agnews.errors import UsageError, run_command
from peft_agnews.metrics import classification_report
from peft_agnews.artifacts import write_json
from peft_agnews.config import label_separator_problems, option, training_option
from peft_agnews.loading import Classifier, ModelArgs, check_output_path, load_classifier
from peft_agnews.scoring import score_texts
from peft_agnews.runtime import accelerator_session
from peft_agnews.figures import plot_confusion_matrix


@dataclass
class EvaluateArgs:
    test_file: str | None = option(None, "Labelled file: canonical AG News CSV, or CSV/JSONL/Parquet with text,label.")
    output_file: str | None = option(
        None, "Metrics JSON (default: eval_<test file name>.json next to the adapter or model folder)."
    )
    plot: bool = option(True, "Also draw the confusion matrix as a PNG next to the JSON (single-label).")
    overwrite: bool = option(False, "Replace an existing output file.")
    label_separator: str = training_option("label_separator")

    def __post_init__(self) -> None:
        if not self.test_file:
            raise UsageError("give the labelled file to score with --test_file")
        for problem in label_separator_problems(self):
            raise UsageError(problem)


def default_output(model_args: ModelArgs, test_file: str) -> Path:
    """eval_<stem>.json in the run folder (the adapter's parent), beside a local merged model, or here."""
    source = Path(model_args.adapter_dir or model_args.model_name_or_path)
    folder = source.parent if source.is_dir() else Path(".")
    return folder / f"eval_{Path(test_file).stem}.json"


def format_report(report: dict) -> str:
    """Per-class precision/recall/F1/support, the overall scores and the confusion matrix as plain text."""
    per_class = pd.DataFrame(report["per_class"]).T[["precision", "recall", "f1", "support"]]
    per_class["support"] = per_class["support"].astype(int)
    names = report["label_names"]
    if "confusion_matrix" not in report:  # multi-label: class sets
        return (
            f"{per_class.to_string(float_format=lambda v: f'{v:.4f}')}\n\n"
            f"micro-F1 {report['f1_micro']:.4f}   macro-F1 {report['f1_macro']:.4f}   subset accuracy "
            f"{report['accuracy']:.4f}   loss {report['loss']:.4f}   examples {report['num_examples']}   "
            f"threshold {report['threshold']}"
        )
    confusion = pd.DataFrame(report["confusion_matrix"], index=[f"true {n}" for n in names], columns=names)
    return (
        f"{per_class.to_string(float_format=lambda v: f'{v:.4f}')}\n\n"
        f"accuracy {report['accuracy']:.4f}   macro-F1 {report['f1_macro']:.4f}   loss {report['loss']:.4f}   "
        f"examples {report['num_examples']}\n\nconfusion matrix (rows: true class, columns: predicted)\n"
        f"{confusion.to_string()}"
    )


def read_labels(classifier: Classifier, test_file: str, label_separator: str) -> tuple[list[str], list]:
    """(texts, labels) of a labelled file as `classifier` scores them: class ids, or multi-hot rows (multi-label)."""
    multi_label = classifier.multi_label_threshold is not None
    data = read_labelled_file(test_file, classifier.label_names, label_separator if multi_label else None)
    labels = list(data["label"])
    return list(data["text"]), multi_hot(labels, len(classifier.label_names)) if multi_label else labels


def main(argv: Sequence[str] | None = None) -> dict:
    model_args, args = parse_args((ModelArgs, EvaluateArgs), argv, description=__doc__.splitlines()[0])
    with log_level(model_args.log_level):
        return evaluate(model_args, args)


def evaluate(model_args: ModelArgs, args: EvaluateArgs) -> dict:
    """Score the classifier on --test_file; the main process writes the report (and the PNG) and prints it."""
    output = Path(args.output_file) if args.output_file else default_output(model_args, args.test_file)
    check_output_path(output, args.overwrite)
    classifier = load_classifier(model_args)
    with accelerator_session(model_args.num_threads) as accelerator:
        with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
            texts, labels = read_labels(classifier, args.test_file, args.label_separator)
        logits, labels = score_texts(classifier, texts, labels, accelerator, model_args, progress="evaluate")
        report = classification_report(logits, labels, classifier.label_names, classifier.multi_label_threshold or 0.5)
        report.update(test_file=str(args.test_file), model=classifier.base_model, adapter_dir=model_args.adapter_dir)
        if accelerator.is_main_process:
            write_json(output, report)
            if args.plot and "confusion_matrix" in report:
                plot_confusion_matrix(report, output.with_suffix(".png"), title=f"{Path(args.test_file).name}")
            print(format_report(report))
            print(f"\nmetrics written to {output}")
        accelerator.wait_for_everyone()
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
