"""Class labels of the data: a label value (a class name or id) or a set of them (multi-label) as class ids, checked
row by row, and multi-hot rows for the multi-label loss. data.py reads the files; every problem is a UsageError
naming the file, the row or value, and the fix."""

from __future__ import annotations

import math
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, List, Value

from peft_agnews.errors import UsageError


def labels_to_ids(raw: Dataset, path: Path, label_names: list[str]) -> Dataset:
    """One class per row: each label a class name or id (a ClassLabel column must carry `label_names`), as ids."""
    by_name = {name: i for i, name in enumerate(label_names)}
    if isinstance(raw.features["label"], ClassLabel):
        file_names = raw.features["label"].names
        if file_names != label_names:
            raise UsageError(f"{path}: label names {file_names} differ from --label_names {label_names}")
        return raw.cast_column("label", Value("int64"))

    def convert(batch: dict, indices: list[int]) -> dict:
        ids = []
        for value in batch["label"]:
            label = label_id(value, by_name, len(label_names))
            if label is None:
                hint = "; several classes per row need --problem_type multi_label_classification" if isinstance(
                    value, list) else ""
                raise UsageError(
                    f"{path}: label {value!r} is not a known class; use ids 0..{len(label_names) - 1} "
                    f"or names {label_names}{hint}"
                )
            ids.append(label)
        check_texts(batch["text"], indices, path)
        return {"text": batch["text"], "label": ids}

    features = Features({"text": Value("string"), "label": Value("int64")})
    return raw.map(convert, batched=True, with_indices=True, features=features, desc="labels")


def label_id(value: object, by_name: dict[str, int], num_labels: int) -> int | None:
    """The class id a label value names (a class name, an id, or an id as text), or None when it names none."""
    if isinstance(value, str):
        value = value.strip()
        label = by_name.get(value, int(value) if value.lstrip("-").isdigit() else None)
    # bool is an int to Python (true would be class 1); NaN and infinity have no class.
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value):
        label = int(value)
    else:
        label = None
    return label if label is not None and 0 <= label < num_labels else None


def check_texts(texts: list, indices: list[int], path: Path) -> None:
    """A UsageError naming the first row (by its index in the file) whose text is set but not a string."""
    for row, text in zip(indices, texts):
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{path}: {non_string_text(row, text)}; every text must be a string")


def label_sets_to_ids(raw: Dataset, path: Path, label_names: list[str], separator: str) -> Dataset:
    """Multi-label rows: each label a list of class names or ids, or one string of them joined by `separator`
    (an empty list or string: no class applies), as sorted, distinct class ids."""
    ambiguous = [name for name in label_names if separator in name]
    if ambiguous:
        raise UsageError(f"class name {ambiguous[0]!r} contains --label_separator {separator!r}; "
                         "choose a separator that no class name contains (e.g. --label_separator '|')")
    feature = raw.features["label"]
    if isinstance(feature, List) and isinstance(feature.feature, ClassLabel) and feature.feature.names != label_names:
        raise UsageError(f"{path}: label names {feature.feature.names} differ from --label_names {label_names}")
    by_name = {name: i for i, name in enumerate(label_names)}

    def convert(batch: dict, indices: list[int]) -> dict:
        sets = []
        for row, value in zip(indices, batch["label"]):
            if isinstance(value, str):
                parts = [part for part in value.split(separator) if part.strip()]
            elif isinstance(value, (list, tuple)):
                parts = list(value)
            else:
                parts = [value]
            ids = [label_id(part, by_name, len(label_names)) for part in parts]
            if value is None or None in ids:
                raise UsageError(
                    f"{path}: row {row + 1} label {value!r} names an unknown class; give a list of class names or "
                    f"ids (0..{len(label_names) - 1}, names {label_names}), or one text of them joined by "
                    f"--label_separator {separator!r} ([] or an empty text: no class)"
                )
            sets.append(sorted(set(ids)))
        check_texts(batch["text"], indices, path)
        return {"text": batch["text"], "label": sets}

    features = Features({"text": Value("string"), "label": List(Value("int64"))})
    return raw.map(convert, batched=True, with_indices=True, features=features, desc="label sets")


def is_multi_label(feature: object) -> bool:
    """Whether a `label` feature holds a set of class ids per row (List of ClassLabel)."""
    return isinstance(feature, List)


def class_names(feature: object) -> list[str]:
    """The class names of a split's `label` feature (a ClassLabel, or a List of them)."""
    return list((feature.feature if is_multi_label(feature) else feature).names)


def non_string_text(row: int, text: object) -> str:
    """'row N text is <type> (<value>), not a string' (row 1-based), for error messages."""
    return f"row {row + 1} text is {type(text).__name__} ({str(text)[:40]}), not a string"


def multi_hot(label_sets: list[list[int]], num_classes: int) -> list[list[float]]:
    """Class-id lists as rows of 0.0/1.0, one column per class."""
    rows = [[0.0] * num_classes for _ in label_sets]
    for row, labels in zip(rows, label_sets):
        for label in labels:
            row[label] = 1.0
    return rows
