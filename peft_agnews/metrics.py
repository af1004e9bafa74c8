"""Classification metrics, reports and misclassified rows, computed from logits and labels (scoring.py produces
them). Labels of one dimension are class ids (single-label: softmax); labels of two dimensions are multi-hot rows
(multi-label: a sigmoid per class, a class predicted at probability >= the threshold)."""

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


def multi_label_predictions(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 per class: sigmoid probability >= `threshold`."""
    return (logits.float().sigmoid() >= threshold).long()


def multi_label_metrics(logits: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Binary cross-entropy loss, subset accuracy (every class of the row right) as `accuracy`, micro- and
    macro-F1, plus `f1_per_class`, `precision_per_class`, `recall_per_class` and `support_per_class` (positives)."""
    preds, truth = multi_label_predictions(logits, threshold), labels.round().long()
    true_pos = (preds * truth).sum(0).double()
    predicted, actual = preds.sum(0).double(), truth.sum(0).double()
    precision, recall = true_pos / predicted.clamp(min=1), true_pos / actual.clamp(min=1)
    f1 = torch.where(predicted + actual > 0, 2 * true_pos / (predicted + actual).clamp(min=1), torch.zeros_like(true_pos))
    micro_denominator = (predicted + actual).sum()
    return {
        "loss": F.binary_cross_entropy_with_logits(logits.float(), labels.float()).item(),
        "accuracy": (preds == truth).all(dim=-1).double().mean().item(),
        "f1_micro": (2 * true_pos.sum() / micro_denominator).item() if micro_denominator else 0.0,
        "f1_macro": f1.mean().item(),
        "num_examples": int(labels.shape[0]),
        "f1_per_class": f1.tolist(),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "support_per_class": actual.long().tolist(),
    }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int,
                           threshold: float = 0.5) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 of `logits` against `labels` (floats), plus `f1_per_class` (list, one F1 per
    label id) and `confusion_matrix` (rows: true label, columns: predicted label). Multi-hot `labels`: see
    `multi_label_metrics` (`threshold` applies to them only)."""
    if labels.ndim == 2:
        return multi_label_metrics(logits, labels, threshold)
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
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """The `limit` wrong predictions made with the highest confidence, most confident first.

    `texts[i]` (labelled `text_labels[i]`) must be the example behind `logits[i]`, see `batching.eval_order`; the
    labels are compared to catch texts listed in another order than the predictions. Multi-label: pass the
    `threshold`; `text_labels[i]` is then a list of class ids."""
    if labels.ndim == 2:
        return _worst_multi_label(logits, labels, texts, text_labels, label_names, limit, threshold)
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


def _worst_multi_label(logits: torch.Tensor, labels: torch.Tensor, texts: list[str], text_labels: list[list[int]],
                       label_names: list[str], limit: int, threshold: float) -> list[dict[str, Any]]:
    """Rows whose predicted class set differs from the true one, the largest per-class error |p - y| first."""
    truth = torch.zeros_like(labels)
    for row, ids in enumerate(text_labels):
        truth[row, list(ids)] = 1
    if not torch.equal(truth, labels):
        raise ValueError("the texts are not in the order of the predictions (their labels differ)")
    probs = logits.float().sigmoid()
    preds = multi_label_predictions(logits, threshold)
    error = (probs - labels.float()).abs().max(dim=-1).values
    wrong = (preds != labels.long()).any(dim=-1).nonzero().flatten()
    worst = wrong[error[wrong].argsort(descending=True)][:limit].tolist()

    def names(row: torch.Tensor) -> str:
        return ", ".join(label_names[i] for i in row.nonzero().flatten().tolist())

    return [{"text": texts[i], "true": names(labels[i]), "predicted": names(preds[i]),
             "largest_error": round(error[i].item(), 4)} for i in worst]


def classification_report(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str],
                          threshold: float = 0.5) -> dict:
    """`classification_metrics` plus per-class precision/recall/F1/support and the confusion matrix (JSON-ready;
    multi-label: no confusion matrix, which has no meaning for class sets)."""
    if labels.ndim == 2:
        metrics = multi_label_metrics(logits, labels, threshold)
        per_class = {name: {"precision": p, "recall": r, "f1": f, "support": s} for name, p, r, f, s in zip(
            label_names, metrics["precision_per_class"], metrics["recall_per_class"], metrics["f1_per_class"],
            metrics["support_per_class"])}
        return {**metrics, "label_names": list(label_names), "per_class": per_class, "threshold": threshold}
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
