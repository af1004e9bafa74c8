"""Load, validate and split labelled text: the Hub's `ag_news`, or local canonical-AG-News / CSV / JSONL / Parquet files.

Every loader returns a `datasets.Dataset` with exactly two columns, `text` (str) and `label` (int class id), or raises
a UsageError naming the file, the problem and the fix before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError

CANONICAL_COLUMNS = ["class", "title", "description"]
_LOADERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _check_readable_text(path: Path) -> str:
    """Return the first line, after checking the whole file decodes as UTF-8."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            first = handle.readline()
            for _ in iter(lambda: handle.read(1 << 20), ""):
                pass
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-encode it as UTF-8"
        ) from None
    return first


def _is_canonical_agnews(first_line: str) -> bool:
    """The canonical AG News CSV has no header: `"class","title","description"` with an integer class."""
    row = next(csv.reader([first_line]), [])
    return len(row) == 3 and row[0].strip().lstrip("-").isdigit()


def _raw_dataset(path: Path, **kwargs) -> Dataset:
    builder = _LOADERS[path.suffix.lower()]
    try:
        return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(err):
            raise UsageError(f"{path}: the file has no rows; give a file with labelled examples") from None
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: could not be parsed as {builder} ({detail}); check the file's format") from None


def read_labelled_file(path_str: str, label_names: list[str]) -> Dataset:
    """Read one labelled file into `text`/`label` columns, validating every row."""
    path = Path(path_str)
    if not path.is_file():
        raise UsageError(f"data file not found: {path_str} (check the path passed to --*_file)")
    suffix = path.suffix.lower()
    if suffix not in _LOADERS:
        raise UsageError(f"{path}: unsupported file type '{suffix}'; use .csv, .jsonl, .json or .parquet")

    # Text formats are decoded once, up front: a non-UTF-8 file fails here with the byte offset.
    first_line = _check_readable_text(path) if suffix in (".csv", ".jsonl", ".json") else ""
    if suffix == ".csv" and _is_canonical_agnews(first_line):
        raw = _raw_dataset(
            path,
            column_names=CANONICAL_COLUMNS,
            header=None,
            features=Features({c: Value("string") for c in CANONICAL_COLUMNS}),
            keep_default_na=False,
        )
        return _validate(_from_canonical(raw, path, len(label_names)), path, label_names)
    raw = _raw_dataset(path, **({"keep_default_na": False} if suffix == ".csv" else {}))
    missing = [c for c in ("text", "label") if c not in raw.column_names]
    if missing:
        raise UsageError(
            f"{path}: missing column(s) {missing}; found {raw.column_names}. Provide 'text' and 'label' columns "
            f"(or the canonical headerless AG News CSV \"class\",\"title\",\"description\")"
        )
    raw = raw.select_columns(["text", "label"])
    return _validate(_labels_to_ids(raw, path, label_names), path, label_names)


def canonical_text(title: str | None, description: str | None) -> str:
    """The model input for a canonical AG News row: title + " " + description."""
    # A literal backslash-n in the canonical files stands for a newline.
    return f"{title or ''} {description or ''}".replace("\\n", "\n").strip()


def _from_canonical(raw: Dataset, path: Path, num_labels: int) -> Dataset:
    def convert(batch: dict) -> dict:
        labels = []
        for i, value in enumerate(batch["class"]):
            value = (value or "").strip()
            if not value.isdigit() or not 1 <= int(value) <= num_labels:
                raise UsageError(
                    f"{path}: class '{value}' is outside 1..{num_labels} (canonical AG News classes are 1-based)"
                )
            labels.append(int(value) - 1)
        texts = [canonical_text(title, desc) for title, desc in zip(batch["title"], batch["description"])]
        return {"text": texts, "label": labels}

    return raw.map(convert, batched=True, remove_columns=raw.column_names, desc="canonical AG News")


def _labels_to_ids(raw: Dataset, path: Path, label_names: list[str]) -> Dataset:
    by_name = {name: i for i, name in enumerate(label_names)}
    if isinstance(raw.features["label"], ClassLabel):
        file_names = raw.features["label"].names
        if file_names != label_names:
            raise UsageError(f"{path}: label names {file_names} differ from --label_names {label_names}")
        return raw.cast_column("label", Value("int64"))

    def convert(batch: dict) -> dict:
        ids = []
        for value in batch["label"]:
            if isinstance(value, str):
                value = value.strip()
                label = by_name.get(value, int(value) if value.lstrip("-").isdigit() else None)
            elif isinstance(value, (int, float)) and value == int(value):
                label = int(value)
            else:
                label = None
            if label is None or not 0 <= label < len(label_names):
                raise UsageError(
                    f"{path}: label {value!r} is not a known class; use ids 0..{len(label_names) - 1} "
                    f"or names {label_names}"
                )
            ids.append(label)
        return {"text": [t if isinstance(t, str) else None for t in batch["text"]], "label": ids}

    features = Features({"text": Value("string"), "label": Value("int64")})
    return raw.map(convert, batched=True, features=features, desc="labels")


def _validate(ds: Dataset, path: Path, label_names: list[str]) -> Dataset:
    if len(ds) == 0:
        raise UsageError(f"{path}: the file has no rows; give a file with labelled examples")
    texts = ds["text"]
    for row, text in enumerate(texts):
        if text is None or not text.strip():
            raise UsageError(f"{path}: row {row + 1} has empty text; remove or fill that row")
    return ds.cast_column("label", ClassLabel(names=label_names))


def _load_hub(cfg: TrainConfig) -> DatasetDict:
    try:
        hub = load_dataset(cfg.dataset_name)
    except Exception as err:
        raise UsageError(
            f"could not load dataset '{cfg.dataset_name}' from the Hub ({type(err).__name__}); "
            "check the name and your connection, or pass local files with --train_file"
        ) from None
    if "train" not in hub or not {"text", "label"} <= set(hub["train"].column_names):
        raise UsageError(f"dataset '{cfg.dataset_name}' needs a 'train' split with 'text' and 'label' columns")
    return hub


def load_splits(cfg: TrainConfig) -> DatasetDict:
    """Build the train / validation (/ test) splits the run will use, every row validated."""
    names = cfg.label_names
    if cfg.train_file:
        train = read_labelled_file(cfg.train_file, names)
    else:
        train = _load_hub(cfg)["train"].select_columns(["text", "label"])
        train = _validate(_labels_to_ids(train, Path(cfg.dataset_name), names), Path(cfg.dataset_name), names)

    splits = {}
    if cfg.validation_file:
        splits["train"] = train
        splits["validation"] = read_labelled_file(cfg.validation_file, names)
    else:
        try:
            parts = train.train_test_split(
                test_size=cfg.validation_split, stratify_by_column="label", seed=cfg.seed
            )
        except ValueError as err:
            raise UsageError(
                f"cannot make a stratified {cfg.validation_split:.0%} validation split ({err}); "
                "give more rows per class or a --validation_file"
            ) from None
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    if cfg.test_file:
        splits["test"] = read_labelled_file(cfg.test_file, names)

    if cfg.max_train_samples is not None:
        splits["train"] = _head(splits["train"], cfg.max_train_samples, cfg.seed)
    if cfg.max_eval_samples is not None:
        splits["validation"] = _head(splits["validation"], cfg.max_eval_samples, cfg.seed)
    return DatasetDict(splits)


def _head(ds: Dataset, n: int, seed: int) -> Dataset:
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def fingerprint_rows(split: Dataset) -> str:
    """sha256 over the rows' texts and labels, in order: equal fingerprints mean the same examples."""
    digest = hashlib.sha256()
    for text, label in zip(split["text"], split["label"]):
        digest.update(f"{label}\t{len(text)}\t{text}".encode())
    return digest.hexdigest()
