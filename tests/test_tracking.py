"""W&B tracking, run for real in offline mode and read back from the run's `.wandb` file.

wandb 0.31 has no Python reader for offline runs (`wandb sync` hands the file to the Go `wandb-core`; offline runs
write no config.yaml / wandb-summary.json). The `.wandb` file is a LevelDB-style log of `wandb_internal_pb2.Record`
protobufs, which `read_offline_run` decodes with wandb's own message classes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import LABELS, REPO, accelerate_launch, run_cli, tiny_train_args
from peft_agnews.config import parse_config
from peft_agnews.errors import UsageError
from peft_agnews.metrics import classification_metrics, worst_misclassified
from peft_agnews.trackers import resolve_trackers, resolve_wandb_mode, wandb_base_url, wandb_key_configured
from peft_agnews.tracking import RunLogger, class_key

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef01"  # 40 hex-like chars, as a real key; never valid
PER_CLASS = [f"eval/f1_{class_key(n)}" for n in LABELS]


# --------------------------------------------------------------------------------------- reading an offline run
def wandb_records(path: Path) -> list:
    """Every record of a `.wandb` file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks
    (crc32c:4, length:2, type:1 FULL/FIRST/MIDDLE/LAST), as in LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunks, records = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _items_to_dict(items, out: dict | None = None) -> dict:
    """Apply config/summary/history items to `out` (a new dict by default); `nested_key` ['a', 'b'] sets
    out['a']['b']."""
    out = {} if out is None else out
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = json.loads(item.value_json)
    return out


def read_offline_run(run_dir: Path) -> dict:
    """{'run': the run record, 'config', 'history' (list of dicts with _step), 'summary', 'artifacts'}."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"config": {}, "history": [], "summary": {}, "artifacts": [], "run": None}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            _items_to_dict(record.run.config.update, out["config"])
        elif kind == "config":
            _items_to_dict(record.config.update, out["config"])
        elif kind == "history":
            out["history"].append(_items_to_dict(record.history.item))
        elif kind == "summary":
            _items_to_dict(record.summary.update, out["summary"])
        elif kind == "artifact":
            out["artifacts"].append(record.artifact)
    return out


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    """Send wandb's own files (artifact staging, cache, settings) to a temporary folder we can scan."""
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    return home


# --------------------------------------------------------------------------------------- the end-to-end run
@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, synthetic_train_csv, synthetic_test_csv, tmp_path_factory):
    """One tiny run on 2 processes (cpu_ddp.yaml) reporting to W&B (offline, a fake API key in the environment,
    WANDB_LOG_MODEL=end), TensorBoard and MLflow (its default store, in the run folder)."""
    root = tmp_path_factory.mktemp("tracked")
    out, home = root / "out", root / "wandb-home"
    argv = tiny_train_args(
        tiny_model_dir, synthetic_train_csv, out, test_file=synthetic_test_csv, report_to="wandb,tensorboard,mlflow",
        run_name="tiny-tracked", wandb_group="tests", wandb_tags="tiny,offline",
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_API_KEY", FAKE_KEY)
        env.setenv("WANDB_LOG_MODEL", "end")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
            (home / sub).mkdir(parents=True)
            env.setenv(var, str(home / sub))
        proc = accelerate_launch("cpu_ddp.yaml", argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = offline_runs(out)
    return {"out": out, "home": home, "stdout": proc.stdout + proc.stderr, "runs": runs, "run_dir": runs[0],
            "wandb": read_offline_run(runs[0])}


@pytest.mark.slow
def test_two_processes_make_exactly_one_wandb_run(tracked_run):
    assert len(tracked_run["runs"]) == 1, tracked_run["runs"]
    assert tracked_run["wandb"]["config"]["accelerate"]["num_processes"] == 2
    assert [a.type for a in tracked_run["wandb"]["artifacts"]].count("model") == 1
    assert tracked_run["stdout"].count("wandb: Find logs at") == 1


@pytest.mark.slow
def test_offline_run_holds_the_full_config(tracked_run):
    run, config = tracked_run["wandb"]["run"], tracked_run["wandb"]["config"]
    assert run.display_name == "tiny-tracked" and run.run_group == "tests" and list(run.tags) == ["tiny", "offline"]
    assert run.project == "peft-agnews"
    assert config["lora_r"] == 8 and config["lora_target_modules"] == ["query", "value"]
    assert config["max_train_steps"] == 12 and config["learning_rate"] == 5e-3
    assert config["accelerate"]["num_processes"] == 2 and config["accelerate"]["gradient_accumulation_steps"] == 2
    assert config["accelerate"]["mixed_precision"] == "no"
    assert config["versions"]["torch"] == torch.__version__ and "wandb" in config["versions"]
    assert config["params"]["trainable_params"] == 3364 and config["params"]["total_params"] > 3364
    assert config["data"] == {"train_examples": 432, "validation_examples": 48, "test_examples": 120}
    assert config["plan"]["total_steps"] == 12 and config["plan"]["effective_batch"] == 64
    # The same config is saved next to the metrics.
    saved = json.loads((tracked_run["out"] / "run_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_wandb"} == saved


@pytest.mark.slow
def test_every_scalar_in_wandb_history_is_in_metrics_jsonl_on_the_optimizer_step_axis(tracked_run):
    history = tracked_run["wandb"]["history"]
    events = [json.loads(line) for line in (tracked_run["out"] / "metrics.jsonl").read_text().splitlines()]
    local: dict[int, dict] = {}
    for event in events:
        # "time" is the wall clock of the event, which W&B keeps as its own `_timestamp`.
        local.setdefault(event["step"], {}).update({k: v for k, v in event.items() if k not in ("step", "time")})
    remote: dict[int, dict] = {}
    for row in history:
        scalars = {k: v for k, v in row.items() if not k.startswith("_") and not isinstance(v, dict)}
        remote.setdefault(row["_step"], {}).update(scalars)
    assert remote == local
    assert sorted(local) == [2, 4, 6, 8, 10, 12]
    train_keys = {"train/loss", "train/lr", "train/epoch", "train/grad_norm", "train/samples_per_second",
                  "train/tokens_per_second"}
    eval_keys = {"eval/loss", "eval/accuracy", "eval/f1_macro", "eval/samples_per_second", *PER_CLASS}
    test_keys = {"test/loss", "test/accuracy", "test/f1_macro", *(k.replace("eval/", "test/") for k in PER_CLASS)}
    assert set(local[2]) == train_keys
    assert set(local[6]) == train_keys | eval_keys
    assert set(local[12]) == train_keys | eval_keys | test_keys
    assert all(local[s]["train/grad_norm"] > 0 for s in local)
    # 64 rows per optimizer step over both processes; tokens per second exceed samples per second (each row has several tokens).
    assert all(local[s]["train/tokens_per_second"] > 3 * local[s]["train/samples_per_second"] > 0 for s in local)
    # Macro F1 is the mean of the logged per-class F1s.
    assert local[6]["eval/f1_macro"] == pytest.approx(sum(local[6][k] for k in PER_CLASS) / 4)


@pytest.mark.slow
def test_confusion_matrix_is_charted_at_each_evaluation_and_saved(tracked_run):
    charted = [row["_step"] for row in tracked_run["wandb"]["history"] if "eval/confusion_matrix_table" in row]
    assert charted == [6, 12]
    assert tracked_run["wandb"]["config"]["_wandb"]["visualize"]["eval/confusion_matrix"]["panel_config"][
        "panelDefId"] == "wandb/confusion_matrix/v1"
    tables = sorted((tracked_run["run_dir"] / "files" / "media" / "table" / "eval").glob("confusion_matrix_table_12_*"))
    (table,) = tables
    rows = json.loads(table.read_text())["data"]
    saved = [json.loads(line) for line in (tracked_run["out"] / "confusion_matrices.jsonl").read_text().splitlines()]
    assert [(m["step"], m["split"]) for m in saved] == [(6, "eval"), (12, "eval"), (12, "test")]
    matrix = saved[1]["matrix"]
    assert {(a, p): n for a, p, n in rows} == {(LABELS[i], LABELS[j]): matrix[i][j] for i in range(4) for j in range(4)}
    events = [json.loads(line) for line in (tracked_run["out"] / "metrics.jsonl").read_text().splitlines()]
    accuracy = next(e["eval/accuracy"] for e in events if e["step"] == 12 and "eval/accuracy" in e)
    assert sum(matrix[i][i] for i in range(4)) / sum(map(sum, matrix)) == pytest.approx(accuracy)
    assert sum(map(sum, saved[2]["matrix"])) == 120


@pytest.mark.slow
def test_misclassified_table_lists_the_worst_validation_mistakes(tracked_run):
    saved = [json.loads(line) for line in (tracked_run["out"] / "misclassified.jsonl").read_text().splitlines()]
    logged = [row for row in tracked_run["wandb"]["history"] if "eval/misclassified" in row]
    assert [row["_step"] for row in logged] == [12]
    table = json.loads((tracked_run["run_dir"] / "files" / logged[0]["eval/misclassified"]["path"]).read_text())
    assert table["columns"] == ["text", "true", "predicted", "confidence", "true_class_probability"]
    assert [dict(zip(table["columns"], row)) for row in table["data"]] == saved
    results = json.loads((tracked_run["out"] / "results.json").read_text())
    assert len(saved) == round((1 - results["best_eval_accuracy"]) * 48)  # every mistake, fewer than 50
    assert all(r["true"] != r["predicted"] and r["confidence"] > r["true_class_probability"] for r in saved)
    assert [r["confidence"] for r in saved] == sorted((r["confidence"] for r in saved), reverse=True)


@pytest.mark.slow
def test_summary_has_best_accuracy_step_test_accuracy_params_and_wall_time(tracked_run):
    summary = tracked_run["wandb"]["summary"]
    results = json.loads((tracked_run["out"] / "results.json").read_text())
    for key in ("best_eval_accuracy", "best_step", "test_accuracy", "trainable_params", "wall_time_seconds"):
        assert summary[key] == results[key], key
    assert results["wall_time_seconds"] > results["train_runtime"] > 0


@pytest.mark.slow
def test_adapter_artifact_is_logged_and_loads_with_peft(tracked_run, tiny_model_dir, tmp_path):
    (artifact,) = [a for a in tracked_run["wandb"]["artifacts"] if a.type == "model"]
    run_id = tracked_run["wandb"]["run"].run_id
    # The Trainer's name: model-<run name> with a run name (--run_name tiny-tracked), else model-<run id>.
    assert run_id and artifact.name == "model-tiny-tracked"
    assert sorted(artifact.aliases) == ["best", "final_model", "latest"]  # W&B adds latest
    metadata = json.loads(artifact.metadata)
    results = json.loads((tracked_run["out"] / "results.json").read_text())
    assert metadata["best_eval_accuracy"] == results["best_eval_accuracy"]
    assert metadata["config"]["lora_r"] == 8
    # Rebuild the artifact from the files the offline run staged for upload, and load it as a reader would.
    files = {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}
    assert {"adapter_model.safetensors", "adapter_config.json", "labels.json"} <= set(files)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for name, source in files.items():
        (fetched / name).write_bytes(source.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(fetched)
    batch = tokenizer(["the striker scored a goal", "shares and profit"], return_tensors="pt", padding=True)
    logits = []
    for folder in (fetched, tracked_run["out"] / "adapter"):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, folder).eval()(**batch).logits)
    assert torch.equal(*logits)


@pytest.mark.slow
def test_api_key_is_never_written_or_printed(tracked_run):
    assert FAKE_KEY not in tracked_run["stdout"]
    scanned = 0
    for root in (tracked_run["out"], tracked_run["home"]):
        for path in root.rglob("*"):
            if path.is_file():
                assert FAKE_KEY.encode() not in path.read_bytes(), path
                scanned += 1
    assert scanned > 20  # the run folder, its logs, the staged artifact files and our own outputs were all read
    for name in ("run_config.json", "results.json"):
        assert "api_key" not in (tracked_run["out"] / name).read_text().lower()


# --------------------------------------------------------------------------------------- processes and resume
@pytest.mark.slow
def test_resume_run_id_reopens_the_same_wandb_run(tmp_path, wandb_dirs):
    """What --resume_from_checkpoint relies on: `RunLogger.run_id` (stored in the checkpoint) passed back to
    `start(resume_run_id=...)` continues the same W&B run (the whole path: test_checkpointing.py)."""
    code = """
import sys
from pathlib import Path
from accelerate import Accelerator
from peft_agnews.config import TrainConfig
from peft_agnews.tracking import RunLogger

def session(out, resume_run_id, step):
    logger = RunLogger(Accelerator(cpu=True, log_with="wandb"), Path(out))
    resume = {"wandb": resume_run_id} if resume_run_id else None
    logger.start(TrainConfig(output_dir=out, report_to="wandb", wandb_mode="offline"), {"seed": 1}, resume_run_ids=resume)
    logger.log({"train/loss": 1.0 / step}, step=step)
    run_id = logger.run_id
    logger.accelerator.end_training()
    return run_id

first = session(sys.argv[1], None, 1)
print("RUN_IDS", first, session(sys.argv[2], first, 5))
"""
    proc = run_cli([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stdout
    first, resumed = proc.stdout.split("RUN_IDS ")[1].split()[:2]
    assert resumed == first and len(first) >= 8
    (before,), (after,) = offline_runs(tmp_path / "a"), offline_runs(tmp_path / "b")
    assert read_offline_run(before)["run"].run_id == read_offline_run(after)["run"].run_id == first
    assert [row["_step"] for row in read_offline_run(after)["history"]] == [5]


# --------------------------------------------------------------------------------------- modes and options
@pytest.mark.parametrize(
    ("report_to", "env_mode", "has_key", "expected"),
    [
        ("wandb", None, False, "offline"),
        ("wandb", None, True, "online"),
        ("wandb", "offline", True, "offline"),
        ("wandb", "dryrun", True, "offline"),
        ("wandb", "disabled", True, None),
        ("offline", "online", True, "offline"),  # the legacy values still force a mode
        ("online", None, True, "online"),
        ("none", "online", True, None),
        ("disabled", None, True, None),
        ("wandb --wandb_mode offline", "online", True, "offline"),  # the flag wins over WANDB_MODE
        ("wandb --wandb_mode disabled", None, True, None),
        ("wandb WANDB_DISABLED=true", "online", True, None),  # the Trainer's WANDB_DISABLED
        ("wandb WANDB_DISABLED=false", "offline", True, "offline"),
        ("tensorboard", "online", True, None),  # W&B not asked for
        ("tensorboard,wandb", "offline", True, "offline"),
    ],
)
def test_mode_resolution(report_to, env_mode, has_key, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    if has_key:
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    argv = ["--report_to"]
    for token in report_to.split():
        if "=" in token:
            monkeypatch.setenv(*token.split("="))
        else:
            argv.append(token)
    assert resolve_wandb_mode(parse_config(argv)) == expected


def test_online_without_a_key_and_unknown_modes_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UsageError, match="online mode needs an API key"):
        resolve_wandb_mode(parse_config(["--report_to", "online"]))
    from peft_agnews.train import cli

    out = tmp_path / "never"
    assert cli(["--report_to", "online", "--output_dir", str(out), "--train_file", "missing.csv"]) == 2
    assert "error: W&B online mode needs an API key" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UsageError, match="WANDB_MODE=sometimes is not a W&B mode"):
        resolve_wandb_mode(parse_config([]))
    for bad, message in ((["--report_to", "tensorflow"], "--report_to tensorflow: choose from wandb, tensorboard, "
                          "mlflow, all, none"), (["--report_to", "none", "wandb"], "none cannot go with other trackers")):
        with pytest.raises(UsageError, match=message):
            parse_config(bad)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_LOG_MODEL", "sometimes")
    with pytest.raises(UsageError, match="WANDB_LOG_MODEL=sometimes is not one of false, end, checkpoint"):
        resolve_trackers(parse_config([]))


def test_tags_and_target_modules_accept_commas_and_output_dir_expands_variables(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    cfg = parse_config(["--wandb_tags", "a,b", "c", "--lora_target_modules=query,key,value",
                        "--output_dir=outputs/sweep/${WANDB_RUN_ID}", "--wandb_entity", "team", "--wandb_group", "g"])
    assert cfg.wandb_tags == ["a", "b", "c"] and cfg.lora_target_modules == ["query", "key", "value"]
    assert cfg.output_dir == "outputs/sweep/abc123" and (cfg.wandb_entity, cfg.wandb_group) == ("team", "g")
    monkeypatch.delenv("WANDB_RUN_ID")
    with pytest.raises(UsageError, match=r"uses \$WANDB_RUN_ID, which is not set"):
        parse_config(["--output_dir", "outputs/$WANDB_RUN_ID"])


# --------------------------------------------------------------------------------------- metrics
def test_per_class_f1_and_confusion_matrix():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    metrics = classification_metrics(torch.nn.functional.one_hot(preds, 3).float() * 5, labels, 3)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    # class 0: precision 2/3, recall 2/3; class 1: 2/3, 1; class 2: 1, 2/3.
    assert metrics["f1_per_class"] == pytest.approx([2 / 3, 0.8, 0.8])
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0.8) / 3)
    assert metrics["accuracy"] == pytest.approx(6 / 8)


def test_worst_misclassified_orders_by_confidence_and_checks_alignment():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 4.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    rows = worst_misclassified(logits, labels, ["a", "b", "c", "d"], [0, 0, 0, 1], ["x", "y"], limit=2)
    assert [r["text"] for r in rows] == ["c", "d"]
    assert rows[0]["true"] == "x" and rows[0]["predicted"] == "y" and rows[0]["confidence"] > 0.98
    with pytest.raises(ValueError, match="not in the order"):
        worst_misclassified(logits, labels, ["a", "b", "c", "d"], [1, 0, 0, 0], ["x", "y"], limit=2)


# --------------------------------------------------------------------------------------- sweep
def test_sweep_file_runs_trials_of_this_trainer(tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch, capsys):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

    from peft_agnews.train import cli

    sweep = load_sweep_config(str(REPO / "launch" / "sweep.yaml"))  # as `wandb sweep` reads it
    assert (REPO / sweep["program"]).is_file() and sweep["metric"]["name"] == "best_eval_accuracy"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    swept = {"lora_r", "lora_alpha", "lora_target_modules", "learning_rate", "lr_scheduler_type"}
    assert swept <= set(sweep["parameters"])
    # Every value choice parses, formatted exactly as `wandb agent` formats a trial's arguments.
    monkeypatch.setenv("WANDB_RUN_ID", "trial1")
    params = sweep["parameters"]
    fixed = {k: v["value"] for k, v in params.items() if "value" in v}
    for name, spec in params.items():
        for choice in spec.get("values", []):
            trial = {**fixed, "learning_rate": params["learning_rate"]["min"], name: choice}
            args = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})["args"]
            cfg = parse_config(args)
            assert cfg.output_dir == "outputs/sweep/trial1"
            if name == "lora_target_modules":
                assert cfg.lora_target_modules == choice.split(",")
            else:
                assert getattr(cfg, name) == choice
    # One trial, dry-run on the tiny model: the trial's options reach the model and the budget check.
    trial = {**fixed, "lora_r": 4, "lora_target_modules": "query,key,value", "output_dir": str(tmp_path / "t")}
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})["args"]
    base = ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(synthetic_train_csv)]
    assert cli([*base, *args, "--dry_run", "true"]) == 0
    # head 32*32+32 + 32*4+4 = 1,188; LoRA r=4 on 3 modules x 2 layers: 6 * (4*(32+32) + 32 bias) = 1,728.
    assert "trainable parameters: 2,916" in capsys.readouterr().out
    assert cli([*base, *args, "--max_trainable_params", "2000"]) == 2
    assert "exceed --max_trainable_params 2,000" in capsys.readouterr().err


def test_wandb_project_and_entity_follow_the_environment_unless_flags_are_given(monkeypatch, tmp_path):
    opened = []

    class RecordingAccelerator:
        is_main_process = True
        trackers = []

        def init_trackers(self, project, config=None, init_kwargs=None):
            opened.append((project, init_kwargs["wandb"].get("entity")))

    def start(*flags):
        RunLogger(RecordingAccelerator(), tmp_path).start(parse_config(["--wandb_mode", "offline", *flags]), {})
        return opened[-1]

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert start() == ("peft-agnews", None)
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    assert start() == ("env-project", "env-team")
    assert start("--wandb_project", "flag-project", "--wandb_entity", "flag-team") == ("flag-project", "flag-team")


def test_self_hosted_server_login_counts_as_a_key(monkeypatch, tmp_path):
    """`wandb login --host URL` stores the key under URL's host in ~/.netrc and URL in W&B's settings file."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    (tmp_path / "netrc").write_text(f"machine wandb.example.com:8080\n  login user\n  password {FAKE_KEY}\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_base_url() == "https://api.wandb.ai" and not wandb_key_configured()  # the cloud has no entry
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8080")
    assert wandb_key_configured() and resolve_wandb_mode(parse_config([])) == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text("[default]\nbase_url = https://wandb.example.com:8080\n")
    assert wandb_base_url() == "https://wandb.example.com:8080" and wandb_key_configured()


# --------------------------------------------------------------------------------------- TensorBoard and MLflow
def metrics_by_step(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {name: {step: value}}."""
    found: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        for key, value in event.items():
            if key not in ("step", "time"):
                found.setdefault(key, {})[event["step"]] = value
    return found


@pytest.mark.slow
def test_tensorboard_events_hold_the_same_metrics_config_and_results(tracked_run):
    """Read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tracked_run["out"]
    (run_dir,) = (out / "runs").iterdir()  # one writer for the 2-process run, in a folder named after the project
    assert run_dir.name == "peft-agnews"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    local = metrics_by_step(out)
    assert {k: v for k, v in logged.items() if not k.startswith("results/")}.keys() == local.keys()
    for key, values in local.items():
        assert logged[key] == pytest.approx(values, rel=1e-6), key  # TensorBoard stores float32
    results = json.loads((out / "results.json").read_text())
    assert logged["results/best_eval_accuracy"] == {12: pytest.approx(results["best_eval_accuracy"])}
    (config_text,) = events.Tensors("config/text_summary")
    assert json.loads(config_text.tensor_proto.string_val[0]) == json.loads((out / "run_config.json").read_text())
    # The hparams plugin's session (Accelerate's store_init_configuration) holds the flattened config.
    (hparams_dir,) = [d for d in run_dir.iterdir() if d.is_dir() and any(d.glob("events.*"))]
    session = EventAccumulator(str(hparams_dir))
    session.Reload()
    content = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lora_r"].number_value == 8 and hparams["plan.total_steps"].number_value == 12
    assert hparams["accelerate.num_processes"].number_value == 2
    assert json.loads(hparams["lora_target_modules"].string_value) == ["query", "value"]


@pytest.mark.slow
def test_mlflow_store_in_the_run_folder_holds_the_metrics_config_and_the_adapter(tracked_run, tiny_model_dir, tmp_path):
    """Read back with MLflow's own client from the default store: SQLite inside the run folder."""
    from mlflow import MlflowClient

    out = tracked_run["out"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "peft-agnews"]
    assert experiment.artifact_location == (out.resolve() / "mlartifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora_r"] == "8" and params["plan.total_steps"] == "12" and params["accelerate.num_processes"] == "2"
    assert params["data.train_examples"] == "432" and json.loads(params["wandb_tags"]) == ["tiny", "offline"]
    for key, values in metrics_by_step(out).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(values), key
    results = json.loads((out / "results.json").read_text())
    assert run.data.metrics["results/test_accuracy"] == pytest.approx(results["test_accuracy"])
    # The adapter is an artifact: download it with the client and load it with PEFT.
    fetched = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "README.md"} <= {p.name for p in fetched.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(fetched)
    batch = tokenizer(["the striker scored a goal"], return_tensors="pt")
    logits = []
    for folder in (fetched, out / "adapter"):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, folder).eval()(**batch).logits)
    assert torch.equal(*logits)
    assert (out / "mlartifacts").is_dir(), "artifacts stay inside the run folder"
