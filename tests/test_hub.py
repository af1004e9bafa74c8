"""The Hub: --push_to_hub at the end of training and the card metadata the Hub reads (hub.py, model_card.py).

No Hub is reachable from the tests: the upload is checked at huggingface_hub's API boundary. A `sitecustomize`
module put on the training processes' path replaces `HfApi.create_repo` / `HfApi.upload_folder` with recorders
that note the repository, the private flag, the commit message, the calling rank and the uploaded files' bytes.
Nothing here was run against the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import REPO, run_cli, tiny_train_args
from peft_agnews.hub import hub_id
from peft_agnews.train import cli

FAKE_TOKEN = "hf_fakeTOKEN0123456789abcdefghijklmnopqrstu"
RECORDER = '''
import hashlib, json, os
from pathlib import Path
import huggingface_hub

def _record(entry):
    with open(os.environ["FAKE_HUB_RECORD"], "a") as handle:
        handle.write(json.dumps({**entry, "rank": os.environ.get("RANK", "0")}) + "\\n")

def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
    _record({"call": "create_repo", "repo_id": repo_id, "private": private, "exist_ok": exist_ok})
    return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
    files = {p.relative_to(folder_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in Path(folder_path).rglob("*") if p.is_file()}
    _record({"call": "upload_folder", "repo_id": repo_id, "commit_message": commit_message, "files": files})

huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
'''


@pytest.fixture(scope="module")
def hub_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a local copy of a Hub model: its config names the Hub id, its card a license."""
    out = tmp_path_factory.mktemp("hub-base") / "roberta-copy"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "_name_or_path": "FacebookAI/roberta-base"}))
    (out / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_push_to_hub_uploads_the_adapter_once_from_the_main_process(hub_base, synthetic_train_csv, synthetic_test_csv,
                                                                    tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER)
    record, out = tmp_path / "calls.jsonl", tmp_path / "out"
    argv = tiny_train_args(hub_base, synthetic_train_csv, out, test_file=synthetic_test_csv, max_train_steps=4,
                           eval_steps=2, push_to_hub="true", hub_model_id="me/agnews-tiny-lora", hub_private_repo="true")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "accelerate_configs" / "cpu_ddp.yaml"), "peft_agnews/train.py", *argv]
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": FAKE_TOKEN, "FAKE_HUB_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli(launch, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(c["call"], c["rank"]) for c in calls] == [("create_repo", "0"), ("upload_folder", "0")]
    assert calls[0]["repo_id"] == calls[1]["repo_id"] == "me/agnews-tiny-lora"
    assert calls[0]["private"] is True and calls[0]["exist_ok"] is True
    assert calls[1]["commit_message"] == "End of training"
    adapter = out / "adapter"
    uploaded = calls[1]["files"]
    assert uploaded == {p.name: sha256(p) for p in adapter.iterdir()}, "the finished adapter folder, as written"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "labels.json", "tokenizer.json"} <= set(uploaded)
    assert "pushed" in proc.stdout and "https://huggingface.co/me/agnews-tiny-lora" in proc.stdout
    # The token is huggingface_hub's business: never printed, never written.
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]

    # The card the Hub would show: the base's Hub id (not the local copy's path), its license, PEFT's tags,
    # model-index with the run's validation and test results; read back through huggingface_hub.
    card = ModelCard.load(adapter / "README.md")
    results = json.loads((out / "results.json").read_text())
    assert card.data.base_model == "FacebookAI/roberta-base" and card.data.license == "mit"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert {"base_model:adapter:FacebookAI/roberta-base", "lora", "transformers", "peft-agnews"} <= set(card.data.tags)
    assert str(hub_base) not in (adapter / "README.md").read_text().split("---")[1], "no local path in the metadata"
    assert card.data.model_name == "me/agnews-tiny-lora"
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("validation", "accuracy")] == pytest.approx(results["best_eval_accuracy"])
    assert found[("test", "accuracy")] == pytest.approx(results["test_accuracy"])
    assert found[("test", "f1")] == pytest.approx(results["test_f1_macro"])
    assert {r.dataset_name for r in card.data.eval_results if r.dataset_split == "test"} == {"test.csv"}


def test_push_to_hub_is_refused_before_training_without_a_repo_or_offline(tiny_model_dir, synthetic_train_csv, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "out"
    base = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, push_to_hub="true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert cli(base) == 2
    assert capsys.readouterr().err.strip() == ("error: invalid config: --push_to_hub needs --hub_model_id "
                                               "(the Hub repository to create or update)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli([*base, "--hub_model_id", "me/x"]) == 2
    assert "--push_to_hub needs the network, but HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists(), "refused before anything was written"


def test_card_metadata_round_trips_and_never_names_a_local_base(trained_adapter_run, tiny_model_dir):
    """A run on a local folder whose config names no Hub id: no base_model, and no local path in PEFT's tag."""
    text = (trained_adapter_run / "adapter" / "README.md").read_text()
    card = ModelCard.load(trained_adapter_run / "adapter" / "README.md")
    assert card.data.base_model is None and str(tiny_model_dir) not in text.split("---")[1]
    assert {"lora", "transformers", "text-classification"} <= set(card.data.tags)
    assert not any(t.startswith("base_model:adapter:") for t in card.data.tags)
    results = json.loads((trained_adapter_run / "results.json").read_text())
    (validation,) = [r for r in card.data.eval_results if (r.dataset_split, r.metric_type) == ("validation", "accuracy")]
    assert validation.metric_value == pytest.approx(results["best_eval_accuracy"])
    assert ModelCard(card.content).data.to_dict() == card.data.to_dict()  # the YAML holds everything


def test_hub_id_of_a_base():
    assert hub_id("roberta-base") == "roberta-base" and hub_id("FacebookAI/roberta-base") == "FacebookAI/roberta-base"
    assert hub_id("/no/such/folder") is None
