"""Multi-label classification (--problem_type multi_label_classification): reading class sets, the metrics, a
training run under `accelerate launch`, `peft-agnews predict`, evaluate, ensemble and export on its adapter, and
plain PEFT loading that adapter with sigmoid semantics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import (
    LABELS, accelerate_launch, direct_logits, multi_label_rows, run_cli, synthetic_rows, tiny_train_args,
    write_canonical_csv, write_multi_label_file,
)
from peft_agnews.config import parse_config
from peft_agnews.data import fingerprint_rows, load_splits_and_validation_source, read_labelled_file
from peft_agnews.errors import UsageError
from peft_agnews.labels import multi_hot
from peft_agnews.metrics import classification_metrics, multi_label_metrics

ML = "multi_label_classification"
TEST_ROWS = multi_label_rows(120, seed=2)


# Reading class sets -------------------------------------------------------------------------------------------------
def test_class_sets_are_read_from_lists_ids_and_joined_names(tmp_path):
    rows = [{"text": "a b", "label": ["Sports", "World"]}, {"text": "c", "label": []}, {"text": "d", "label": ["Sci/Tech"]}]
    (tmp_path / "names.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": [LABELS.index(n) for n in r["label"]]})
                                                + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "names.parquet")
    pd.DataFrame({"text": [r["text"] for r in rows], "label": ["Sports | World", "", "3"]}).to_csv(tmp_path / "j.csv", index=False)
    for name, separator in (("names.jsonl", ","), ("ids.jsonl", ","), ("names.parquet", ","), ("j.csv", "|")):
        data = read_labelled_file(str(tmp_path / name), LABELS, separator)
        assert list(data["label"]) == [[0, 1], [], [3]], name  # sorted ids; an empty set is a row with no class
        assert data.features["label"].feature.names == LABELS


@pytest.mark.parametrize("label,message", [
    (["Sports", "Weather"], r"row 2 label \['Sports', 'Weather'\] names an unknown class"),
    (None, "row 2 label None names an unknown class"),
])
def test_an_unknown_class_in_a_set_is_one_clear_error(tmp_path, label, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a", "label": ["World"]}) + "\n" + json.dumps({"text": "b", "label": label}) + "\n")
    with pytest.raises(UsageError, match=message):
        read_labelled_file(str(path), LABELS, ",")


def test_class_sets_that_cannot_be_read_are_refused(tmp_path, synthetic_train_csv):
    with pytest.raises(UsageError, match=r"class name 'Sci/Tech' contains --label_separator '/'"):
        read_labelled_file(str(write_multi_label_file(tmp_path / "a.csv", TEST_ROWS, "/")), LABELS, "/")
    with pytest.raises(UsageError, match="canonical AG News CSV, one class per row"):
        read_labelled_file(str(synthetic_train_csv), LABELS, ",")
    # A set of classes without --problem_type multi_label_classification: the error says what is missing.
    with pytest.raises(UsageError, match="need --problem_type multi_label_classification"):
        read_labelled_file(str(write_multi_label_file(tmp_path / "b.jsonl", TEST_ROWS)), LABELS)


def test_multi_label_options_that_make_no_sense_are_refused():
    cfg = parse_config(["--problem_type", ML])
    assert (cfg.metric_for_best_model, cfg.greater_is_better) == ("f1_micro", True)
    for argv, message in ((["--label_smoothing", "0.1"], "--label_smoothing smooths a single-label"),
                          (["--rdrop_alpha", "1"], "--rdrop_alpha compares two softmax"),
                          (["--multi_label_threshold", "1.0"], "--multi_label_threshold must be in")):
        with pytest.raises(UsageError, match=message):
            parse_config(["--problem_type", ML, *argv])


def test_validation_rows_are_held_out_at_random_and_fingerprinted(tmp_path):
    train = write_multi_label_file(tmp_path / "train.jsonl", multi_label_rows(100, seed=3))
    splits, source = load_splits_and_validation_source(parse_config(["--train_file", str(train), "--problem_type", ML]))
    assert (len(splits["train"]), len(splits["validation"])) == (90, 10)
    assert source == "a random 10% split of the training data (seed 37)"  # no stratification by a set of classes
    labels = list(splits["train"]["label"])
    assert fingerprint_rows(list(splits["train"]["text"]), labels) != fingerprint_rows(
        list(splits["train"]["text"]), [label[:1] for label in labels])


# Metrics --------------------------------------------------------------------------------------------------------------
def test_multi_label_metrics_match_hand_computed_values():
    truth = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.3, 0.55], [0.1, 0.2, 0.3]])
    logits = torch.logit(probs)
    got = multi_label_metrics(logits, truth, threshold=0.5)
    # predicted: {0,2} {1} {0,2} {}: rows 1, 2 and 4 exactly right. Per class (tp, fp, fn): (2,0,0) (1,0,1) (1,1,0).
    assert got["accuracy"] == pytest.approx(3 / 4)
    assert got["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert got["f1_per_class"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert got["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert got["precision_per_class"] == pytest.approx([1.0, 1.0, 0.5])
    assert got["recall_per_class"] == pytest.approx([1.0, 0.5, 1.0]) and got["support_per_class"] == [2, 2, 1]
    assert got["loss"] == pytest.approx(F.binary_cross_entropy(probs, truth).item(), rel=1e-5)
    assert multi_label_metrics(logits, truth, threshold=0.58)["f1_per_class"][2] == pytest.approx(1.0)  # 0.55 now off
    # classification_metrics dispatches on the labels' shape: class ids stay single-label.
    assert classification_metrics(logits, truth, 3) == got
    assert "confusion_matrix" in classification_metrics(logits, torch.tensor([0, 1, 0, 2]), 3)


# A run, and everything that reads its adapter -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multi-label-data")
    texts = folder / "texts.csv"
    pd.DataFrame({"ID": range(100, 100 + len(TEST_ROWS)), "text": [text for _, text in TEST_ROWS]}).to_csv(texts, index=False)
    return {"train": write_multi_label_file(folder / "train.jsonl", multi_label_rows(480, seed=1)),
            "test": write_multi_label_file(folder / "test.csv", TEST_ROWS, separator="|"), "texts": texts}


@pytest.fixture(scope="module")
def ml_run(tiny_model_dir, ml_data, tmp_path_factory) -> Path:
    """`accelerate launch --config_file cpu_ddp.yaml peft_agnews/train.py --problem_type multi_label_classification
    ...`: two CPU processes (multi-hot labels gathered from both), JSON Lines training rows (lists of names), a CSV
    test file of names joined by '|'."""
    out = tmp_path_factory.mktemp("multi-label-run")
    args = tiny_train_args(tiny_model_dir, ml_data["train"], out, test_file=ml_data["test"], problem_type=ML,
                           label_separator="|", max_train_steps=48, eval_steps=16, learning_rate=2e-2)
    proc = accelerate_launch("cpu_ddp.yaml", args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def all_classes_f1(rows: list[tuple[list[int], str]]) -> float:
    """Micro-F1 of predicting every class for every row: what a model that learned nothing scores at best."""
    positives = sum(len(ids) for ids, _ in rows)
    return 2 * positives / (positives + 4 * len(rows))


@pytest.mark.slow
def test_accelerate_launch_trains_a_multi_label_adapter(ml_run):
    results = json.loads((ml_run / "results.json").read_text())
    assert results["num_processes"] == 2
    events = [json.loads(line) for line in (ml_run / "metrics.jsonl").read_text().splitlines()]
    evals = [(e["step"], e["eval/f1_micro"]) for e in events if "eval/f1_micro" in e]
    assert [step for step, _ in evals] == [16, 32, 48]
    best_step, best = max(evals, key=lambda e: e[1])
    assert results["metric_for_best_model"] == "f1_micro"
    assert (results["best_step"], results["best_metric"], results["best_eval_f1_micro"]) == (best_step, best, best)
    # It learned: far above the all-classes baseline (0.59 here), the binary cross-entropy below log 2.
    assert results["test_f1_micro"] >= 0.75 > all_classes_f1(TEST_ROWS) + 0.1, results
    assert results["test_loss"] < math.log(2) and results["test_examples"] == len(TEST_ROWS)
    labels = json.loads((ml_run / "adapter" / "labels.json").read_text())
    assert labels == {"id2label": dict(zip("0123", LABELS)), "problem_type": ML, "multi_label_threshold": 0.5}
    report = json.loads((ml_run / "eval_validation.json").read_text())
    assert report["f1_micro"] == pytest.approx(best) and "confusion_matrix" not in report
    assert report["num_examples"] == 48  # every validation row once, from both processes
    assert sum(c["support"] for c in report["per_class"].values()) > report["num_examples"]  # sets of classes
    wrong = [json.loads(line) for line in (ml_run / "misclassified.jsonl").read_text().splitlines()]
    assert wrong and all(row["true"] != row["predicted"] and 0 < row["largest_error"] <= 1 for row in wrong)
    card = (ml_run / "adapter" / "README.md").read_text()
    assert "| split | examples | micro-F1 | macro-F1 | subset accuracy | loss |" in card
    assert f"| {results['test_f1_micro']:.4f} |" in card and "highest validation f1_micro" in card
    assert 'problem_type="multi_label_classification"' in card


@pytest.fixture(scope="module")
def plain_peft_logits(ml_run, tiny_model_dir):
    """The test rows' logits from the adapter loaded the plain PEFT way, with transformers' problem_type."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4, problem_type=ML)
    model = PeftModel.from_pretrained(base, ml_run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(ml_run / "adapter")
    return model, tokenizer, direct_logits(model, tokenizer, [text for _, text in TEST_ROWS])


@pytest.mark.slow
def test_plain_peft_loads_the_adapter_with_sigmoid_semantics(ml_run, plain_peft_logits):
    model, tokenizer, logits = plain_peft_logits
    truth = torch.tensor(multi_hot([ids for ids, _ in TEST_ROWS], 4))
    # The model's own loss on multi-hot labels is the per-class binary cross-entropy (a sigmoid per class).
    batch = tokenizer([text for _, text in TEST_ROWS[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=truth[:8])
    assert out.loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(out.logits, truth[:8]).item(), rel=1e-5)
    # The run's test scores are those of these logits at the saved threshold.
    results = json.loads((ml_run / "results.json").read_text())
    scores = multi_label_metrics(logits, truth, threshold=0.5)
    assert scores["f1_micro"] == pytest.approx(results["test_f1_micro"], abs=1e-6)
    assert scores["loss"] == pytest.approx(results["test_loss"], rel=1e-4)


@pytest.mark.slow
def test_peft_agnews_predict_writes_class_sets_and_sigmoid_probabilities(ml_run, ml_data, plain_peft_logits, tmp_path):
    out = tmp_path / "predictions.csv"
    script = Path(sys.executable).parent / "peft-agnews"  # the console script, as users type it
    proc = run_cli([str(script), "predict", "--adapter_dir", str(ml_run / "adapter"), "--input_file",
                    str(ml_data["texts"]), "--output_file", str(out), "--with_label_names", "--with_probabilities",
                    "--label_separator", "|"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "predict: 100%" in proc.stderr  # the progress bar (main process)
    written = pd.read_csv(out, keep_default_na=False, dtype={"Label": str})
    probs = plain_peft_logits[2].sigmoid()
    assert torch.allclose(torch.tensor(written.filter(like="prob_").to_numpy(), dtype=torch.float32), probs, atol=1e-5)
    chosen = [[i for i, p in enumerate(row) if p >= 0.5] for row in probs.tolist()]
    assert written.Label.tolist() == ["|".join(map(str, ids)) for ids in chosen]
    assert written.label_name.tolist() == ["|".join(LABELS[i] for i in ids) for ids in chosen]
    assert written.ID.tolist() == list(range(100, 100 + len(TEST_ROWS)))
    assert any(len(ids) > 1 for ids in chosen) and any(len(ids) == 1 for ids in chosen)


@pytest.mark.slow
def test_evaluate_and_ensemble_report_multi_label_metrics(ml_run, ml_data, plain_peft_logits, tmp_path, capsys):
    from peft_agnews.ensemble import main as ensemble
    from peft_agnews.evaluate import main as evaluate

    truth = torch.tensor(multi_hot([ids for ids, _ in TEST_ROWS], 4))
    expected = multi_label_metrics(plain_peft_logits[2], truth, threshold=0.4)
    report = evaluate(["--adapter_dir", str(ml_run / "adapter"), "--test_file", str(ml_data["test"]),
                       "--label_separator", "|", "--multi_label_threshold", "0.4", "--output_file", str(tmp_path / "e.json")])
    assert report["f1_micro"] == pytest.approx(expected["f1_micro"]) and report["threshold"] == 0.4
    assert report["accuracy"] == pytest.approx(expected["accuracy"]) and "confusion_matrix" not in report
    assert not (tmp_path / "e.png").exists()  # no confusion matrix for class sets
    printed = capsys.readouterr()
    assert f"micro-F1 {expected['f1_micro']:.4f}" in printed.out and "evaluate: 100%" in printed.err
    result = ensemble(["--adapter_dirs", str(ml_run / "adapter"), str(ml_run / "adapter"), "--test_file",
                       str(ml_data["test"]), "--label_separator", "|"])
    at_half = multi_label_metrics(plain_peft_logits[2], truth, threshold=0.5)
    assert result["f1_micro"] == pytest.approx(at_half["f1_micro"]) and result["threshold"] == 0.5
    assert result["accuracy"] == pytest.approx(at_half["accuracy"])
    assert "member 2/2: 100%" in capsys.readouterr().err


@pytest.mark.slow
def test_merged_export_keeps_problem_type_and_threshold(ml_run, tmp_path):
    from transformers import AutoConfig

    from peft_agnews.export import main as export
    from peft_agnews.loading import ModelArgs, load_classifier

    out = tmp_path / "merged"
    export(["--adapter_dir", str(ml_run / "adapter"), "--merge", "--output_dir", str(out), "--multi_label_threshold", "0.3"])
    assert AutoConfig.from_pretrained(out).problem_type == ML  # pipeline("text-classification") then uses a sigmoid
    assert json.loads((out / "labels.json").read_text())["multi_label_threshold"] == 0.3
    assert load_classifier(ModelArgs(model_name_or_path=str(out))).multi_label_threshold == 0.3
    assert "the classes scoring >= 0.3 apply" in (out / "README.md").read_text()


def test_a_threshold_for_a_single_label_adapter_is_refused(trained_adapter_run, tmp_path):
    from peft_agnews.loading import ModelArgs, load_classifier

    with pytest.raises(UsageError, match="--multi_label_threshold applies to multi-label classifiers"):
        load_classifier(ModelArgs(adapter_dir=str(trained_adapter_run / "adapter"), multi_label_threshold=0.4))


def test_a_multi_label_hub_dataset_takes_its_class_names_from_the_feature(tmp_path):
    from datasets import ClassLabel, Dataset, Features, List, Value

    names = ["alpha", "beta", "gamma"]
    features = Features({"sentence": Value("string"), "labels": List(ClassLabel(names=names))})
    rows = [([i for i in ids if i < 3], text) for ids, text in multi_label_rows(40, seed=4)]  # some sets empty
    Dataset.from_dict({"sentence": [t for _, t in rows], "labels": [ids for ids, _ in rows]},
                      features=features).to_parquet(str(tmp_path / "train.parquet"))
    cfg = parse_config(["--dataset_name", str(tmp_path), "--problem_type", ML, "--text_column_names", "sentence",
                        "--label_column_name", "labels"])
    splits, _ = load_splits_and_validation_source(cfg)
    assert splits["train"].features["label"].feature.names == names
    got = sorted((text, tuple(ids)) for split in ("train", "validation")
                 for text, ids in zip(splits[split]["text"], splits[split]["label"]))
    assert got == sorted((text, tuple(ids)) for ids, text in rows) and any(not ids for ids, _ in rows)


def test_single_label_data_still_reads_one_class_per_row(tmp_path):
    data = read_labelled_file(str(write_canonical_csv(tmp_path / "c.csv", synthetic_rows(8))), LABELS)
    assert list(data["label"]) == [i % 4 for i in range(8)] and data.features["label"].names == LABELS
