"""Metrics against hand-computed values, and evaluation equal to calling the model directly."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from peft_agnews.metrics import classification_metrics
from peft_agnews.scoring import score_split


def test_metrics_match_hand_computation():
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    preds = torch.tensor([0, 1, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(preds, 4).float() * 5
    m = classification_metrics(logits, labels, 4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: class0 P=1 R=.5 -> 2/3; class1 P=2/3 R=1 -> .8; class2 P=.5 R=1 -> 2/3; class3 -> 0
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 2 / 3 + 0) / 4)
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert m["num_examples"] == 6


def test_score_split_equals_direct_model_calls(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4).eval()
    texts = ["goal coach season", "shares profit", "nasa chip software internet", "treaty", "minister election border"]
    labels = [1, 2, 3, 0, 0]
    rows = [{**tokenizer(t), "labels": y} for t, y in zip(texts, labels)]
    loader = DataLoader(rows, batch_size=2, collate_fn=DataCollatorWithPadding(tokenizer))
    accelerator = Accelerator(cpu=True)
    metrics = score_split(model, accelerator.prepare(loader), accelerator, 4)
    with torch.no_grad():
        direct = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    expected = (direct.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected)
    assert math.isclose(metrics["loss"], torch.nn.functional.cross_entropy(direct, torch.tensor(labels)).item(), rel_tol=1e-5)
    assert metrics["num_examples"] == 5
