"""Loading every supported format, the stratified split, and every bad-input case."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from datasets import ClassLabel

from conftest import HUB_STYLE_NAMES, LABELS, synthetic_rows, write_canonical_csv, write_hub_style_dataset
from peft_agnews.config import TrainConfig
from peft_agnews.data import load_splits, load_splits_and_validation_source, read_labelled_file
from peft_agnews.errors import UsageError


def hf_frame(n: int = 40) -> pd.DataFrame:
    rows = synthetic_rows(n, seed=5)
    return pd.DataFrame({"text": [f"{t} {d}" for _, t, d in rows], "label": [label for label, _, _ in rows]})


def test_canonical_csv_joins_title_and_description_and_shifts_classes(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"3","Wall St. Bears","Short-sellers are\\nseeing green again."\n"1","Title","Body"\n')
    ds = read_labelled_file(str(path), LABELS)
    assert ds["text"] == ["Wall St. Bears Short-sellers are\nseeing green again.", "Title Body"]
    assert ds["label"] == [2, 0]
    assert isinstance(ds.features["label"], ClassLabel) and ds.features["label"].names == LABELS


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_hf_style_files_with_text_and_label(tmp_path, suffix):
    frame = hf_frame()
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    ds = read_labelled_file(str(path), LABELS)
    assert ds["text"] == frame["text"].tolist() and ds["label"] == frame["label"].tolist()
    assert ds.column_names == ["text", "label"]


def test_label_names_are_accepted_as_labels(tmp_path):
    path = tmp_path / "named.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}", "label": name}) for i, name in enumerate(LABELS)) + "\n")
    assert read_labelled_file(str(path), LABELS)["label"] == [0, 1, 2, 3]


def test_shared_real_files_load(shared_data):
    canonical = read_labelled_file(str(shared_data / "agnews" / "train_head10429.csv"), LABELS)
    assert len(canonical) == 10_429
    assert Counter(canonical["label"]) == {0: 2630, 1: 2452, 2: 2594, 3: 2753}
    assert canonical[0]["text"].startswith("Wall St. Bears Claw Back Into the Black (Reuters)")
    parquet = read_labelled_file(str(shared_data / "agnews" / "extra" / "hf_train_sample2000_a.parquet"), LABELS)
    assert len(parquet) == 2000 and Counter(parquet["label"]) == {0: 488, 1: 511, 2: 498, 3: 503}


def test_stratified_split_is_90_10_per_class_and_seeded(synthetic_train_csv):
    cfg = TrainConfig(train_file=str(synthetic_train_csv))
    splits = load_splits(cfg)
    assert (len(splits["train"]), len(splits["validation"])) == (432, 48)
    assert Counter(splits["validation"]["label"]) == {0: 12, 1: 12, 2: 12, 3: 12}
    again = load_splits(cfg)
    assert again["validation"]["text"] == splits["validation"]["text"]
    other = load_splits(TrainConfig(train_file=str(synthetic_train_csv), seed=1))
    assert other["validation"]["text"] != splits["validation"]["text"]


def test_validation_and_test_files_and_sample_caps(synthetic_train_csv, synthetic_test_csv):
    cfg = TrainConfig(
        train_file=str(synthetic_train_csv), validation_file=str(synthetic_test_csv), test_file=str(synthetic_test_csv),
        max_train_samples=100, max_eval_samples=30,
    )
    splits = load_splits(cfg)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (100, 30, 120)


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('"5","t","d"\n', ".csv", "class '5' is outside 1..4"),
        ('"0","t","d"\n', ".csv", "class '0' is outside 1..4"),
        ("text,label\nhello,7\n", ".csv", "label 7 is not a known class"),
        ('{"text": "hello", "label": "Politics"}\n', ".jsonl", "label 'Politics' is not a known class"),
        ("text,label\n,1\nfine,2\n", ".csv", "row 1 has empty text"),
        ('"2","",""\n', ".csv", "row 1 has empty text"),
        ("text,label\n", ".csv", "has no rows"),
        ("sentence,category\nhello,1\n", ".csv", r"missing column\(s\) \['text', 'label'\]"),
        ('{"sentence": "x", "label": 1}\n', ".jsonl", r"missing column\(s\) \['text'\]"),
        ("whatever", ".xlsx", "unsupported file type"),
        ('{"text": "hello", "label": NaN}\n', ".jsonl", "label nan is not a known class"),
        ('{"text": "hello", "label": Infinity}\n', ".jsonl", "label inf is not a known class"),
        ('{"text": "hello", "label": true}\n', ".jsonl", "label True is not a known class"),  # was class 1
        ('{"text": "hello", "label": 1}\n{"text": 42, "label": 2}\n', ".jsonl", r"row 2 text is int \(42\), not a string"),
        ('"' + "goal " * 30_000 + '",x,y\n', ".csv", "the first line is not readable as CSV"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        read_labelled_file(str(path), LABELS)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_non_utf8_file(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        read_labelled_file(str(tmp_path / "absent.csv"), LABELS)
    latin = tmp_path / "latin1.csv"
    latin.write_bytes('"1","Caf\xe9","cr\xe8me"\n'.encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8 text"):
        read_labelled_file(str(latin), LABELS)


def test_malformed_parquet_is_a_usage_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(UsageError, match="could not be parsed as parquet"):
        read_labelled_file(str(path), LABELS)


def test_too_few_rows_for_a_stratified_split(tmp_path):
    path = write_canonical_csv(tmp_path / "tiny.csv", synthetic_rows(4))
    with pytest.raises(UsageError, match="stratified"):
        load_splits(TrainConfig(train_file=str(path)))


# ----------------------------------------------------------------------------------- --dataset_name (load_dataset)
def test_dataset_folder_gives_joined_text_classlabel_names_and_its_test_split(hub_style_dataset):
    """A local dataset folder goes through the very `load_dataset(name, config)` call the Hub's ag_news does."""
    cfg = TrainConfig(dataset_name=str(hub_style_dataset), text_column_names=["title", "description"],
                      label_column_name="topic")
    splits = load_splits(cfg)
    assert set(splits) == {"train", "validation", "test"}
    assert (len(splits["train"]) + len(splits["validation"]), len(splits["test"])) == (480, 100)
    for split in splits.values():
        assert split.column_names == ["text", "label"] and split.features["label"].names == HUB_STYLE_NAMES
    label, title, description = synthetic_rows(100, seed=11)[0]  # the test split's first row
    assert splits["test"][0] == {"text": f"{title} {description}", "label": label}
    assert "test" not in load_splits(TrainConfig(**{**cfg.__dict__, "evaluate_test_split": False}))
    # --label_names wins over the dataset's ClassLabel, and must then match it.
    with pytest.raises(UsageError, match="differ from --label_names"):
        load_splits(TrainConfig(**{**cfg.__dict__, "label_names": LABELS}))


def test_dataset_folder_validation_split_is_used_and_missing_columns_are_named(tmp_path):
    folder = write_hub_style_dataset(tmp_path / "ds", {"train": 80, "validation": 20, "test": 20})
    cfg = TrainConfig(dataset_name=str(folder), text_column_names=["title"], label_column_name="topic")
    splits, source = load_splits_and_validation_source(cfg)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (80, 20, 20)
    # What the model card says about the validation rows: the dataset's own split, not a stratified one.
    assert source == f"the `validation` split of `{folder}`"
    no_validation = write_hub_style_dataset(tmp_path / "ds2", {"train": 80, "test": 20})
    _, source = load_splits_and_validation_source(TrainConfig(**{**cfg.__dict__, "dataset_name": str(no_validation),
                                                                "max_eval_samples": 4}))
    assert source == "a stratified 10% split of the training data (seed 37), 4 of its rows drawn at random " \
                     "(--max_eval_samples, seed 37)"
    with pytest.raises(UsageError, match=r"no column\(s\) \['text', 'label'\].*--text_column_names"):
        load_splits(TrainConfig(dataset_name=str(folder)))
def test_non_utf8_byte_offset_is_the_files_own_and_a_folder_is_named(tmp_path):
    """The offset was counted within the decoder's 8 KiB read chunk, so a bad byte past it was misplaced."""
    path = tmp_path / "late.csv"
    good = ('"1","title","' + "x" * 20_000 + '"\n').encode()
    path.write_bytes(good + b'"2","Caf\xe9","d"\n')
    with pytest.raises(UsageError, match=rf"byte {len(good) + 8}: invalid continuation byte"):
        read_labelled_file(str(path), LABELS)
    with pytest.raises(UsageError, match="is a folder, not a file"):
        read_labelled_file(str(tmp_path), LABELS)


def test_a_canonical_csv_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's UTF-8 BOM made the canonical file fail with a misleading "missing column" message."""
    plain = write_canonical_csv(tmp_path / "plain.csv", synthetic_rows(12, seed=3))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    expected = read_labelled_file(str(plain), LABELS)
    got = read_labelled_file(str(bom), LABELS)
    assert got["text"] == expected["text"] and got["label"] == expected["label"]
    headed = tmp_path / "headed.csv"
    headed.write_bytes("\ufefftext,label\ngoal coach,Sports\nshares bank,Business\n".encode())
    assert read_labelled_file(str(headed), LABELS)["label"] == [1, 2]


@pytest.mark.parametrize("text", ["\x00", "\u200b\u200b", " \u200d\ufeff\u2060 ", "\x00 \t\u3000"])
def test_text_of_only_invisible_characters_is_empty(text, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "goal coach", "label": 1}) + "\n" + json.dumps({"text": text, "label": 2}) + "\n")
    with pytest.raises(UsageError, match="row 2 has empty text"):
        read_labelled_file(str(path), LABELS)


@pytest.mark.slow
def test_evaluate_reads_a_canonical_csv_with_a_byte_order_mark(trained_adapter_run, tmp_path):
    import sys

    from conftest import run_cli

    bom = tmp_path / "test.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + write_canonical_csv(tmp_path / "plain.csv", synthetic_rows(20, seed=6)).read_bytes())
    proc = run_cli([sys.executable, "-m", "peft_agnews.evaluate", "--adapter_dir", str(trained_adapter_run / "adapter"),
                    "--test_file", str(bom), "--output_file", str(tmp_path / "report.json"), "--plot", "false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "report.json").read_text())["num_examples"] == 20
