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
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Our code, for the deprecation rule below: the package, its tests and benchmarks.
OUR_CODE = tuple(str(REPO / folder) + os.sep for folder in ("peft_agnews", "tests", "benchmarks"))
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
CLASS_WORDS = [
    ["minister", "election", "treaty", "embassy", "rebels", "summit", "parliament", "border"],
    ["goal", "coach", "season", "league", "striker", "tournament", "inning", "medal"],
    ["shares", "profit", "earnings", "merger", "investors", "stocks", "revenue", "bank"],
    ["software", "internet", "chip", "nasa", "computer", "wireless", "genome", "browser"],
]
FILLER = ["the", "a", "of", "on", "in", "said", "new", "today", "after", "report", "week", "year", "more", "over"]


def deprecated_call_site(stacklevel: int):
    """The frame that called the API now warning with `stacklevel` (from `warnings.warn`'s replacement below)."""
    frame = sys._getframe(2)
    for _ in range(max(stacklevel, 2) - 1):  # stacklevel 1 (the library forgot it) and 2 both mean its caller
        frame = frame.f_back if frame.f_back is not None else frame
    return frame


def _warn_failing_our_deprecated_calls(message, category=None, stacklevel=1, source=None, **kwargs):
    """`warnings.warn` for the tests: a deprecation warning about a call made by our code is raised as an error.

    pyproject.toml's filterwarnings turns deprecations attributed to our modules into errors, but a library that warns
    without `stacklevel` (transformers' `gradient_checkpointing_enable`, `is_gradient_checkpointing`) attributes the
    warning to itself; here the call site is found one frame up, so our call of it fails the test all the same.
    """
    kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(kind, DEPRECATIONS):
        site = deprecated_call_site(stacklevel)
        if site.f_code.co_filename.startswith(OUR_CODE):
            raise message if isinstance(message, Warning) else kind(message)
    return _original_warn(message, category, stacklevel + 1, source, **kwargs)


_original_warn = warnings.warn


def pytest_configure(config) -> None:
    warnings.warn = _warn_failing_our_deprecated_calls


def pytest_unconfigure(config) -> None:
    warnings.warn = _original_warn


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """(label 0-3, title, description) rows whose class is readable from keywords, with varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 4
        words = lambda k: " ".join(rng.choice(CLASS_WORDS[label] + FILLER * 2) for _ in range(k))  # noqa: E731
        rows.append((label, words(rng.randint(2, 5)).capitalize(), words(rng.randint(3, 30))))
    return rows


def multi_label_rows(n: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """(sorted class ids, text) rows with one class (a third of them) or two, each class readable from its
    keywords: the multi-label set the tests train on."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        first = i % 4
        labels = [first] if rng.random() < 1 / 3 else sorted({first, rng.choice([c for c in range(4) if c != first])})
        words = [w for label in labels for w in rng.sample(CLASS_WORDS[label], 2)]
        words += rng.sample(FILLER, rng.randint(1, 8)) + rng.sample(CLASS_WORDS[labels[-1]], 1)
        rng.shuffle(words)
        rows.append((labels, " ".join(words).capitalize()))
    return rows


def write_multi_label_file(path: Path, rows: list[tuple[list[int], str]], separator: str = ",") -> Path:
    """JSON Lines (label: a list of class names) or, for a .csv path, `text,label` with the names joined by
    `separator`."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": text, "label": [LABELS[i] for i in ids]}) + "\n" for ids, text in rows))
        return path
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([text, separator.join(LABELS[i] for i in ids)] for ids, text in rows)
    return path


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
    config_file: str, script_args: list[str], timeout: int = 600, script: str = "peft_agnews/train.py",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config_file> <script> ...` (training by default);
    `env`: extra environment variables."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    return run_cli(
        [*launcher, "--config_file", str(REPO / "accelerate_configs" / config_file), script, *script_args],
        timeout=timeout, env=env,
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


def toy_batch() -> dict:
    """Three rows of ids 0-30 (the tiny vocabulary), with padding and labels: a batch for direct model calls."""
    import torch

    return {
        "input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1], [0, 11, 2, 1, 1]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([0, 3, 1]),
    }


def four_layer_model(**options):
    """A random 4-layer, 32-wide RoBERTa classifier (dropout off) with LoRA as `options` (TrainConfig fields) say."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from peft_agnews.config import TrainConfig
    from peft_agnews.model import apply_lora

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, num_labels=4, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    return apply_lora(RobertaForSequenceClassification(config), TrainConfig(lora_dropout=0.0, **options))


def prefix_args(model_dir, train_csv, out, **overrides) -> list[str]:
    """2 epochs (the cache is filled in the first and read in the second), LoRA on the top layer of 2."""
    return tiny_train_args(model_dir, train_csv, out, max_train_steps=None, num_train_epochs=2, eval_steps=100,
                           per_device_train_batch_size=16, gradient_accumulation_steps=1, mixed_precision="no",
                           lora_layers="top1", model_dropout=0.0, overwrite_output_dir="true", **overrides)


def assert_same_adapter(run: Path, reference: Path) -> None:
    """The two runs' adapters hold the same weights (and LoRA B moved from its zero init)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (run, reference))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k), "LoRA B must have moved from zero"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


PREFIX_RUN_OPTIONS = {"plain": {"frozen_prefix": "false"}, "prefix": {}, "cache": {"cache_frozen_prefix": "true"}}


@pytest.fixture(scope="session")
def prefix_runs(no_dropout_model_dir, synthetic_train_csv, tmp_path_factory):
    """One-process runs of `prefix_args` (fp32, dropout off), each trained once when first asked for: the plain
    model ('plain'), the frozen prefix ('prefix') and the prefix with its cache ('cache')."""
    from peft_agnews.train import cli

    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(name)
            assert cli(prefix_args(no_dropout_model_dir, synthetic_train_csv, runs[name], **PREFIX_RUN_OPTIONS[name])) == 0
        return runs[name]

    return run


def tiny_lora_model(model_dir: Path, **overrides):
    """The tiny model with LoRA as `overrides` (TrainConfig fields) say; LoRA dropout 0, no checkpointing."""
    import torch

    from peft_agnews.config import TrainConfig
    from peft_agnews.model import apply_lora, load_base_model

    options = {"lora_dropout": 0.0, "gradient_checkpointing": False, **overrides}
    cfg = TrainConfig(model_name_or_path=str(model_dir), **options)
    torch.manual_seed(0)
    return apply_lora(load_base_model(cfg), cfg)


def roberta_base_config(vocab_size: int = 1000):
    """roberta-base's shape (12 x 768, FFN 3072); the trainable count does not depend on the vocabulary size."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=vocab_size, num_labels=4)


@pytest.fixture(scope="session")
def mean_head_adapters(tiny_model_dir, synthetic_train_csv, tmp_path_factory) -> list[Path]:
    """Two 6-step adapters (seeds 1 and 2) with the research head `--classifier_head mean` (head.json)."""
    from peft_agnews.train import cli

    dirs = []
    for seed, head in ((1, "mean"), (2, "mean")):
        out = tmp_path_factory.mktemp(f"member{seed}")
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, seed=seed, classifier_head=head,
                                   max_train_steps=6, eval_steps=6, gradient_checkpointing="false")) == 0
        dirs.append(out / "adapter")
    return dirs


RECIPES = REPO / "recipes"
# Each recipe's head and LoRA settings on the tiny model of its base's architecture (MiniLM is a BERT).
RECIPE_ARCH = {"reference.yaml": "roberta", "best.yaml": "roberta", "proxy-minilm.yaml": "bert", "fast.yaml": "roberta",
               "proxy-fast.yaml": "bert"}
# The tiny models have 2 layers: the fast recipes' top-layer LoRA (top6 / top3) becomes the top one of them.
# The fast recipes on the 2-layer tiny models: LoRA on the top layer, whose attention (like the real recipes' lowest
# trained layer) gets none.
TOP1_FEED_FORWARD_ONLY = ["--lora_layers", "top1", "--lora_exclude_modules",
                          *[f"layer.1.attention.{name}" for name in ("self.query", "self.key", "self.value", "output.dense")]]
RECIPE_SHRINK = {"fast.yaml": TOP1_FEED_FORWARD_ONLY, "proxy-fast.yaml": TOP1_FEED_FORWARD_ONLY}
PLAIN_TEXTS = ["Striker scores late goal as coach praises season", "Shares of the bank fell after earnings report",
               "Minister meets rebels at border summit"]


@pytest.fixture(scope="session")
def recipe_runs(tiny_model_dir, tiny_bert_dir, synthetic_train_csv, tmp_path_factory):
    """A few-step training run of each recipe file on the tiny model of its architecture (lazily, per recipe)."""
    from peft_agnews.train import cli

    runs: dict[str, Path] = {}

    def run(recipe: str) -> Path:
        if recipe not in runs:
            base = tiny_bert_dir if RECIPE_ARCH[recipe] == "bert" else tiny_model_dir
            out = tmp_path_factory.mktemp(recipe.split(".")[0])
            argv = ["--config", str(RECIPES / recipe),
                    *tiny_train_args(base, synthetic_train_csv, out, max_train_steps=4, eval_steps=4,
                                     gradient_checkpointing="false", mixed_precision="no"),
                    *RECIPE_SHRINK.get(recipe, [])]
            with pytest.MonkeyPatch.context() as patch:  # the proxy recipe names its base through $MINILM_DIR
                patch.setenv("MINILM_DIR", str(base))
                assert cli(argv) == 0
            runs[recipe] = out
        return runs[recipe]

    return run
