"""Classification metrics, reports and misclassified rows, computed from logits and labels (scoring.py produces
them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Counts with true classes as rows and predicted classes as columns."""
    return torch.bincount(labels * num_labels + preds, minlength=num_labels * num_labels).view(num_labels, -1)


def per_class_scores(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(precision, recall, F1) per class from a confusion matrix; 0 where a class is never predicted or present."""
    true_pos = confusion.diag().double()
    precision = true_pos / confusion.sum(0).clamp(min=1)
    recall = true_pos / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return precision, recall, f1


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 of `logits` against `labels` (floats), plus `f1_per_class` (list, one F1 per
    label id) and `confusion_matrix` (rows: true label, columns: predicted label)."""
    preds = logits.argmax(dim=-1)
    confusion = confusion_matrix(preds, labels, num_labels)
    _, _, f1 = per_class_scores(confusion)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (preds == labels).double().mean().item(),
        "f1_macro": f1.mean().item(),
        "num_examples": int(labels.numel()),
        "f1_per_class": f1.tolist(),
        "confusion_matrix": confusion.tolist(),
    }


def worst_misclassified(
    logits: torch.Tensor,
    labels: torch.Tensor,
    texts: list[str],
    text_labels: list[int],
    label_names: list[str],
    limit: int,
) -> list[dict[str, Any]]:
    """The `limit` wrong predictions made with the highest confidence, most confident first.

    `texts[i]` (labelled `text_labels[i]`) must be the example behind `logits[i]`, see `batching.eval_order`; the
    labels are compared to catch texts listed in another order than the predictions."""
    if not torch.equal(torch.as_tensor(text_labels, dtype=labels.dtype), labels):
        raise ValueError("the texts are not in the order of the predictions (their labels differ)")
    probs = logits.float().softmax(dim=-1)
    confidence, preds = probs.max(dim=-1)
    wrong = (preds != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:limit].tolist()
    return [
        {
            "text": texts[i],
            "true": label_names[labels[i]],
            "predicted": label_names[preds[i]],
            "confidence": round(confidence[i].item(), 4),
            "true_class_probability": round(probs[i, labels[i]].item(), 4),
        }
        for i in worst
    ]


def classification_report(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict:
    """`classification_metrics` plus per-class precision/recall/F1/support and the confusion matrix (JSON-ready)."""
    confusion = confusion_matrix(logits.argmax(dim=-1), labels, len(label_names))
    precision, recall, f1 = per_class_scores(confusion)
    per_class = {
        name: {"precision": p, "recall": r, "f1": f, "support": s}
        for name, p, r, f, s in zip(label_names, precision.tolist(), recall.tolist(), f1.tolist(), confusion.sum(1).tolist())
    }
    return {
        **classification_metrics(logits, labels, len(label_names)),
        "label_names": list(label_names),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
