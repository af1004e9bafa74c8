"""Shared fixtures: a tiny random RoBERTa with its own word-level tokenizer, and small synthetic AG-News-like files.

Everything runs offline. Real data from ../shared is used only by tests that ask for `shared_data` (skipped
with a reason when that folder is absent).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
CLASS_WORDS = [
    ["minister", "election", "treaty", "embassy", "rebels", "summit", "parliament", "border"],
    ["goal", "coach", "season", "league", "striker", "tournament", "inning", "medal"],
    ["shares", "profit", "earnings", "merger", "investors", "stocks", "revenue", "bank"],
    ["software", "internet", "chip", "nasa", "computer", "wireless", "genome", "browser"],
]
FILLER = ["the", "a", "of", "on", "in", "said", "new", "today", "after", "report", "week", "year", "more", "over"]


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """(label 0-3, title, description) rows whose class is readable from keywords, with varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 4
        words = lambda k: " ".join(rng.choice(CLASS_WORDS[label] + FILLER * 2) for _ in range(k))  # noqa: E731
        rows.append((label, words(rng.randint(2, 5)).capitalize(), words(rng.randint(3, 30))))
    return rows


def write_canonical_csv(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    """The canonical AG News layout: headerless, all fields quoted, 1-based class."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL)
        for label, title, desc in rows:
            writer.writerow([label + 1, title, desc])
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """The BERT twin of tiny_model_dir (the MiniLM proxy's architecture: a pretrained pooler, a one-Linear head)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), arch="bert")


def build_tiny_model(out: Path, arch: str = "roberta", num_layers: int = 2) -> Path:
    """A 2-layer (or `num_layers`), 32-wide RoBERTa (or BERT) encoder (briefly pretrained, see _pretrain) +
    word-level tokenizer, saved like a Hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    words = sorted({w for ws in CLASS_WORDS for w in ws} | set(FILLER) | {w.capitalize() for ws in CLASS_WORDS for w in ws})
    words += sorted({w.capitalize() for w in FILLER})
    cls, pad, sep, unk = ("<s>", "<pad>", "</s>", "<unk>") if arch == "roberta" else ("[CLS]", "[PAD]", "[SEP]", "[UNK]")
    vocab = {cls: 0, pad: 1, sep: 2, unk: 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    processing = processors.RobertaProcessing if arch == "roberta" else processors.BertProcessing
    backend.post_processor = processing((sep, 2), (cls, 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep, model_max_length=128,
        **({"bos_token": cls, "eos_token": sep} if arch == "roberta" else {}),
    )
    tokenizer.save_pretrained(out)
    shape = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=160, pad_token_id=1, num_labels=4)
    torch.manual_seed(0)
    if arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**shape, bos_token_id=0, eos_token_id=2))
        _pretrain(model, tokenizer).roberta.save_pretrained(out)
    else:  # BERT's encoder includes its pooler, pretrained like MiniLM's
        _pretrain(BertForSequenceClassification(BertConfig(**shape)), tokenizer).bert.save_pretrained(out)
    return out


def _pretrain(model, tokenizer, steps: int = 40):
    """Stand-in for pretraining: a brief full fine-tune on rows disjoint from the test data (seed 99).

    A random 32-wide encoder gives near-identical [CLS] features for every input, so neither a head nor LoRA
    could learn on it; LoRA assumes a pretrained base. Only the encoder is saved: the head starts fresh.
    """
    import torch

    rows = synthetic_rows(512, seed=99)
    enc = tokenizer([f"{t} {d}" for _, t, d in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([label for label, _, _ in rows])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (32,), generator=generator)
        model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx], labels=labels[idx]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="session")
def synthetic_train_csv(tmp_path_factory) -> Path:
    return write_canonical_csv(tmp_path_factory.mktemp("data") / "train.csv", synthetic_rows(480, seed=1))


@pytest.fixture(scope="session")
def synthetic_test_csv(tmp_path_factory) -> Path:
    return write_canonical_csv(tmp_path_factory.mktemp("data") / "test.csv", synthetic_rows(120, seed=2))


HUB_STYLE_NAMES = ["Politics", "Sport", "Money", "Tech"]  # not AG News's: they must come from the ClassLabel


def write_hub_style_dataset(folder: Path, splits: dict[str, int]) -> Path:
    """A dataset folder `load_dataset(folder)` reads like a Hub dataset: `<split>.parquet` files with `title`,
    `description` and a ClassLabel `topic` (named HUB_STYLE_NAMES), `rows` synthetic rows per split."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"title": Value("string"), "description": Value("string"),
                         "topic": ClassLabel(names=HUB_STYLE_NAMES)})
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, rows) in enumerate(splits.items()):
        data = synthetic_rows(rows, seed=10 + seed)
        columns = {"title": [t for _, t, _ in data], "description": [d for _, _, d in data],
                   "topic": [label for label, _, _ in data]}
        Dataset.from_dict(columns, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.fixture(scope="session")
def hub_style_dataset(tmp_path_factory) -> Path:
    return write_hub_style_dataset(tmp_path_factory.mktemp("hub-style"), {"train": 480, "test": 100})


@pytest.fixture
def shared_data() -> Path:
    folder = SHARED / "data"
    if not (folder / "agnews" / "train_head10429.csv").is_file():
        pytest.skip(f"real data not present at {folder} (../shared is laid out only on the project's machines)")
    return folder


def tiny_train_args(model_dir: Path, train_file: Path, output_dir: Path, **overrides) -> list[str]:
    """Command-line options for a few-second training run on the tiny model."""
    options = {
        "model_name_or_path": model_dir,
        "train_file": train_file,
        "output_dir": output_dir,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "max_train_steps": 12,
        "eval_steps": 6,
        "save_steps": 0,
        "logging_steps": 2,
        "learning_rate": 5e-3,
        "lora_dropout": 0.0,
        "report_to": "none",
        # fp32 everywhere: `auto` picks bf16 on CPUs with native bf16 only, and these runs must train (and pin
        # numbers) alike on every machine. The precision table has its own tests (test_hardware.py).
        "mixed_precision": "no",
        **overrides,
    }
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root and capture its output (stderr merged into stdout)."""
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def accelerate_launch(
    config_file: str, script_args: list[str], timeout: int = 600, script: str = "peft_agnews/train.py"
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config_file> <script> ...` (training by default)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    return run_cli(
        [*launcher, "--config_file", str(REPO / "accelerate_configs" / config_file), script, *script_args],
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def no_dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with hidden/attention dropout 0 (RoBERTa's default 0.1 would draw different masks in runs
    that must train alike); the classifier head inherits hidden_dropout_prob."""
    out = tmp_path_factory.mktemp("tiny-no-dropout")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=None)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def trained_adapter_run(tiny_model_dir, synthetic_train_csv, tmp_path_factory) -> Path:
    """A finished 8-step training run on the tiny model (adapter, metrics, card, plots), shared by the
    evaluate/predict/export/plot tests, which must not modify it."""
    from peft_agnews.train import cli

    out = tmp_path_factory.mktemp("adapter-run")
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=8, eval_steps=4)) == 0
    return out


def direct_logits(model, tokenizer, texts: list[str], max_length: int = 128):
    """Logits of `model` called on one text at a time (no padding, no batching): the reference for inference code."""
    import torch

    model.eval()
    with torch.no_grad():
        rows = [model(**tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0] for t in texts]
    return torch.stack(rows)


def load_adapter_directly(adapter_dir: Path, base_dir: Path, num_labels: int = 4):
    """The adapter on its base the plain PEFT way (what the README tells users), with its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), AutoTokenizer.from_pretrained(adapter_dir)
