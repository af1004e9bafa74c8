"""evaluate: the metrics of direct model calls, JSON + table + PNG, each example once on two processes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import LABELS, accelerate_launch, direct_logits, load_adapter_directly, run_cli, synthetic_rows, write_canonical_csv
from peft_agnews.cli import main as peft_agnews
from peft_agnews.data import read_labelled_file
from peft_agnews.evaluate import cli, main
from peft_agnews.metrics import confusion_matrix
from peft_agnews.loading import ModelArgs, load_classifier
from peft_agnews.scoring import score_texts
from peft_agnews.runtime import accelerator_session


@pytest.fixture(scope="module")
def odd_test_csv(tmp_path_factory):
    """37 labelled rows: an odd count, so two ranks need a padding duplicate that must not be counted."""
    return write_canonical_csv(tmp_path_factory.mktemp("eval") / "odd.csv", synthetic_rows(37, seed=7))


@pytest.fixture(scope="module")
def direct(trained_adapter_run, tiny_model_dir, odd_test_csv):
    """(logits, labels) from calling the adapter model row by row, the plain PEFT way."""
    data = read_labelled_file(str(odd_test_csv), LABELS)
    model, tokenizer = load_adapter_directly(trained_adapter_run / "adapter", tiny_model_dir)
    return direct_logits(model, tokenizer, data["text"]), torch.tensor(data["label"])


def test_scoring_equals_direct_model_calls(trained_adapter_run, odd_test_csv, direct):
    """Length-sorted, padded batches put back in input order give the per-row logits of direct calls."""
    args = ModelArgs(adapter_dir=str(trained_adapter_run / "adapter"), per_device_eval_batch_size=5)
    classifier = load_classifier(args)
    data = read_labelled_file(str(odd_test_csv), classifier.label_names)
    with accelerator_session() as accelerator:
        logits, labels = score_texts(classifier, data["text"], data["label"], accelerator, args)
    assert torch.allclose(logits, direct[0], atol=1e-5)
    assert torch.equal(labels, direct[1])


def test_report_matches_direct_predictions_and_is_written(trained_adapter_run, odd_test_csv, direct, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    report = main(["--adapter_dir", str(trained_adapter_run / "adapter"), "--test_file", str(odd_test_csv),
                   "--output_file", str(out)])
    logits, labels = direct
    preds = logits.argmax(-1)
    assert report["num_examples"] == 37
    assert report["accuracy"] == pytest.approx((preds == labels).double().mean().item(), abs=1e-12)
    assert report["confusion_matrix"] == confusion_matrix(preds, labels, 4).tolist()
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-5)
    assert list(report["per_class"]) == LABELS
    for i, name in enumerate(LABELS):
        cls = report["per_class"][name]
        predicted, actual, hits = (preds == i).sum().item(), (labels == i).sum().item(), ((preds == i) & (labels == i)).sum().item()
        assert cls["support"] == actual
        assert cls["precision"] == pytest.approx(hits / predicted if predicted else 0.0)
        assert cls["recall"] == pytest.approx(hits / actual)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "precision" in printed and "confusion matrix" in printed and f"accuracy {report['accuracy']:.4f}" in printed


def test_default_output_goes_to_the_run_folder_and_is_not_overwritten(trained_adapter_run, odd_test_csv, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_adapter_run / "adapter", run / "adapter")
    argv = ["evaluate", "--adapter_dir", str(run / "adapter"), "--test_file", str(odd_test_csv), "--plot", "false"]
    assert peft_agnews(argv) == 0
    written = (run / "eval_odd.json").read_text()
    assert not (run / "eval_odd.png").exists()
    assert peft_agnews(argv) == 2
    assert "already exists" in capsys.readouterr().err and (run / "eval_odd.json").read_text() == written
    assert peft_agnews([*argv, "--overwrite"]) == 0


def test_merged_model_is_scored_like_the_adapter(trained_adapter_run, odd_test_csv, tmp_path):
    from peft_agnews.export import main as export

    merged = export(["--adapter_dir", str(trained_adapter_run / "adapter"), "--merge", "--output_dir", str(tmp_path / "m")])
    common = ["--test_file", str(odd_test_csv), "--plot", "false"]
    a = main(["--adapter_dir", str(trained_adapter_run / "adapter"), "--output_file", str(tmp_path / "a.json"), *common])
    m = main(["--model_name_or_path", str(merged), "--output_file", str(tmp_path / "m.json"), *common])
    assert m["confusion_matrix"] == a["confusion_matrix"] and m["loss"] == pytest.approx(a["loss"], abs=1e-5)
    wrong = ["--model_name_or_path", str(merged), "--output_file", str(tmp_path / "x.json"), *common]
    assert cli([*wrong, "--label_names", "a", "b"]) == 2 and not (tmp_path / "x.json").exists()


def test_labels_outside_the_models_classes_are_refused(trained_adapter_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "goal coach", "label": "Weather"}\n')
    assert cli(["--adapter_dir", str(trained_adapter_run / "adapter"), "--test_file", str(bad),
                "--output_file", str(tmp_path / "m.json")]) == 2
    assert "'Weather' is not a known class" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_two_processes_count_each_example_once(trained_adapter_run, odd_test_csv, direct, tmp_path):
    out = tmp_path / "ddp.json"
    proc = accelerate_launch(
        "cpu_ddp.yaml",
        ["--adapter_dir", str(trained_adapter_run / "adapter"), "--test_file", str(odd_test_csv), "--output_file",
         str(out), "--per_device_eval_batch_size", "4"],
        script="peft_agnews/evaluate.py",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    preds = direct[0].argmax(-1)
    assert report["num_examples"] == 37 and sum(map(sum, report["confusion_matrix"])) == 37
    assert report["confusion_matrix"] == confusion_matrix(preds, direct[1], 4).tolist()
    assert proc.stdout.count("metrics written to") == 1


@pytest.mark.slow
def test_runs_as_a_module():
    proc = run_cli([sys.executable, "-m", "peft_agnews.evaluate", "--help"], timeout=120)
    assert proc.returncode == 0 and "--test_file" in proc.stdout and "--adapter_dir" in proc.stdout


@pytest.mark.slow
def test_the_png_beside_the_json_is_checked_like_the_json(trained_adapter_run, odd_test_csv, tmp_path):
    """`evaluate --output_file report.json` replaced an existing report.png without --overwrite."""
    (tmp_path / "report.png").write_bytes(b"my figure")
    evaluate = [sys.executable, "-m", "peft_agnews.evaluate", "--adapter_dir", str(trained_adapter_run / "adapter"),
                "--test_file", str(odd_test_csv)]
    proc = run_cli([*evaluate, "--output_file", str(tmp_path / "report.json")])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --output_file {tmp_path / 'report.png'} already exists; choose another path or pass --overwrite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]
    assert (tmp_path / "report.png").read_bytes() == b"my figure"
    # Inside the adapter folder: refused as the adapter is an input.
    proc = run_cli([*evaluate, "--output_file", str(trained_adapter_run / "adapter" / "eval.json")])
    assert proc.returncode == 2 and "lies inside the input --adapter_dir" in proc.stderr, proc.stderr
    assert not (trained_adapter_run / "adapter" / "eval.json").exists()
    in_process = evaluate[3:]
    assert cli([*in_process, "--output_file", str(tmp_path / "report.png")]) == 2
    assert main([*in_process, "--output_file", str(tmp_path / "report.json"), "--overwrite"])["num_examples"] == 37
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
