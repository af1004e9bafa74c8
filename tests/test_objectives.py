"""The loss: the model's own cross-entropy by default, label smoothing and R-Drop as defined."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import tiny_lora_model, toy_batch
from peft_agnews.objectives import classification_loss, symmetric_kl

BATCH = toy_batch()


def test_default_loss_is_the_models_own(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir).eval()
    assert torch.equal(classification_loss(model, BATCH), model(**BATCH).loss)


def test_label_smoothing_changes_the_loss_as_defined(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir).eval()
    logits = model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    smoothed = classification_loss(model, BATCH, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, BATCH["labels"], label_smoothing=0.1))
    assert not torch.isclose(smoothed, F.cross_entropy(logits, BATCH["labels"]))


def test_rdrop_adds_the_kl_between_two_dropout_passes(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir)  # the base's hidden dropout (0.1) differs between the two passes in train mode
    model.eval()  # no dropout: both passes agree, the KL is zero and the loss is the plain cross-entropy
    torch.testing.assert_close(classification_loss(model, BATCH, rdrop_alpha=4.0), model(**BATCH).loss)
    model.train()  # dropout on: the passes differ and the KL term raises the loss above the pure CE part
    torch.manual_seed(1)
    with_kl = classification_loss(model, BATCH, rdrop_alpha=100.0)
    torch.manual_seed(1)
    without = classification_loss(model, BATCH, rdrop_alpha=1e-12)
    assert with_kl > without + 1e-3
    p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    expected = (F.softmax(p, -1) * (F.log_softmax(p, -1) - F.log_softmax(q, -1))).sum()
    torch.testing.assert_close(symmetric_kl(p, q), expected)  # symmetric pair: both directions are equal
