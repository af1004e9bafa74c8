"""Classify an unlabelled file and write a submission CSV `ID,Label` (+ label names and probabilities on request).

A multi-label classifier writes each row's classes (those at sigmoid probability >= its threshold) joined by
--label_separator, e.g. `0,3` (and `World,Sci/Tech` in label_name); an empty field when no class applies.

    accelerate launch peft_agnews/predict.py --adapter_dir outputs/agnews-lora/adapter \\
        --input_file test.parquet --output_file submission.csv
    python -m peft_agnews.predict ...        peft-agnews predict ...

Input: CSV, JSON Lines, Parquet (a text column, or AG News title + description), plain text (one item per line),
or a pandas pickle with --trust_pickle. Rows are scored longest first for speed and written in input order.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from peft_agnews.cli import parse_args
from peft_agnews.data import TABLE_SUFFIXES, canonical_text, check_input_file, read_table
from peft_agnews.labels import non_string_text
from peft_agnews.errors import UsageError, first_line, run_command
from peft_agnews.files import atomic_write
from peft_agnews.config import label_separator_problems, option, training_option
from peft_agnews.console import log_level
from peft_agnews.loading import Classifier, ModelArgs, check_output_path, load_classifier
from peft_agnews.metrics import multi_label_predictions
from peft_agnews.scoring import score_texts
from peft_agnews.runtime import accelerator_session

PICKLE_SUFFIXES = (".pkl", ".pickle")
SUPPORTED = (".csv", ".jsonl", ".json", ".parquet", ".txt", *PICKLE_SUFFIXES)


@dataclass
class PredictArgs:
    input_file: str | None = option(None, f"Unlabelled rows: {', '.join(SUPPORTED)}.")
    output_file: str | None = option(None, "CSV to write: ID,Label (+ label_name, prob_<class> columns on request).")
    text_column: str = option("text", "Column holding the text (else title + description are joined, as in training).")
    id_column: str = option("ID", "Column copied to the output's ID (default: the row index when absent).")
    with_label_names: bool = option(False, "Add a label_name column.")
    with_probabilities: bool = option(
        False, "Add one prob_<class> column per class (softmax; multi-label: each class's sigmoid).")
    label_separator: str = training_option(
        "label_separator", "Multi-label: the separator between a row's classes in Label and label_name.")
    trust_pickle: bool = option(False, "Allow reading a pandas pickle: unpickling runs code from the file.")
    overwrite: bool = option(False, "Replace an existing output file.")

    def __post_init__(self) -> None:
        if not self.input_file or not self.output_file:
            raise UsageError("give --input_file (rows to classify) and --output_file (the CSV to write)")
        for problem in label_separator_problems(self):
            raise UsageError(problem)


def read_unlabelled(args: PredictArgs) -> tuple[list, list[str]]:
    """(ids, texts) of the input file, validated: it has rows, a text column and no empty text."""
    path = Path(args.input_file)
    suffix = path.suffix.lower()
    check_input_file(path, "--input_file")
    if suffix not in SUPPORTED:
        raise UsageError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED)}")
    if suffix in PICKLE_SUFFIXES and not args.trust_pickle:
        raise UsageError(
            f"{path} is a pickle: loading it runs arbitrary code from the file. Convert it to Parquet/CSV, or pass "
            "--trust_pickle if you trust its source"
        )
    frame = _read_frame(path, suffix, args.text_column)
    if len(frame) == 0:
        raise UsageError(f"{path}: the file has no rows; give a file with text to classify")
    texts = _texts(frame, path, args.text_column)
    for row, text in enumerate(texts):
        if text is not None and not isinstance(text, str) and not (isinstance(text, float) and math.isnan(text)):
            raise UsageError(f"{path}: {non_string_text(row, text)}; every text must be a string")
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{path}: row {row + 1} has empty or missing text; remove or fill that row")
    ids = frame[args.id_column].tolist() if args.id_column in frame.columns else list(range(len(frame)))
    return ids, texts


def _read_frame(path: Path, suffix: str, text_column: str) -> pd.DataFrame:
    if suffix in TABLE_SUFFIXES:  # read as training data is (a canonical AG News CSV's class column is ignored)
        return read_table(path, "--input_file", "text to classify", all_text=True)[0].to_pandas()
    try:
        if suffix == ".txt":
            return pd.DataFrame({text_column: path.read_text(encoding="utf-8").splitlines()})
        loaded = pd.read_pickle(path)
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason}); re-encode it as UTF-8") from None
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise UsageError(f"{path}: could not be parsed ({first_line(err)}); check the file's format") from None
    if isinstance(loaded, pd.Series):
        return loaded.to_frame(text_column)
    if not isinstance(loaded, pd.DataFrame):
        raise UsageError(f"{path}: the pickle holds a {type(loaded).__name__}, not a pandas DataFrame or Series")
    return loaded


def _texts(frame: pd.DataFrame, path: Path, text_column: str) -> list[str]:
    if text_column in frame.columns:
        return frame[text_column].tolist()
    if {"title", "description"} <= set(frame.columns):
        return [canonical_text(t, d) for t, d in zip(frame["title"], frame["description"])]
    raise UsageError(
        f"{path}: no '{text_column}' column (found {list(frame.columns)}); name the text column with --text_column "
        "or provide title and description columns"
    )


def predictions_frame(ids: list, logits, classifier: Classifier, args: PredictArgs) -> pd.DataFrame:
    """The output table, one row per input row, in input order."""
    label_names, threshold = classifier.label_names, classifier.multi_label_threshold
    if threshold is None:
        preds = logits.argmax(dim=-1).tolist()
        out = pd.DataFrame({"ID": ids, "Label": preds})
        if args.with_label_names:
            out["label_name"] = [label_names[p] for p in preds]
    else:
        chosen = [row.nonzero().flatten().tolist() for row in multi_label_predictions(logits, threshold)]
        out = pd.DataFrame({"ID": ids, "Label": [args.label_separator.join(map(str, row)) for row in chosen]})
        if args.with_label_names:
            out["label_name"] = [args.label_separator.join(label_names[i] for i in row) for row in chosen]
    if args.with_probabilities:
        probs = (logits.softmax(dim=-1) if threshold is None else logits.float().sigmoid()).numpy()
        for i, name in enumerate(label_names):
            out[f"prob_{name}"] = probs[:, i]
    return out


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write via a temporary file and a rename: the CSV appears complete or not at all."""
    with atomic_write(path) as handle:
        frame.to_csv(handle, index=False)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    model_args, args = parse_args((ModelArgs, PredictArgs), argv, description=__doc__.splitlines()[0])
    with log_level(model_args.log_level):
        return predict(model_args, args)


def predict(model_args: ModelArgs, args: PredictArgs) -> pd.DataFrame:
    """Classify --input_file and write --output_file (main process); every process returns the table."""
    output = Path(args.output_file)
    check_output_path(output, args.overwrite)
    ids, texts = read_unlabelled(args)
    classifier = load_classifier(model_args)
    with accelerator_session(model_args.num_threads) as accelerator:
        logits, _ = score_texts(classifier, texts, None, accelerator, model_args, progress="predict")
        frame = predictions_frame(ids, logits, classifier, args)
        if accelerator.is_main_process:
            write_csv(frame, output)
            print(f"wrote {len(frame)} predictions to {output}")
        accelerator.wait_for_everyone()
    return frame


def cli(argv: Sequence[str] | None = None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
