"""The training objective: cross-entropy, optionally with label smoothing and R-Drop.

With both off the loss is the model's own (`model(**batch).loss`), so the reference recipe is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0, rdrop_alpha: float = 0.0
) -> torch.Tensor:
    """The loss of one micro-batch.

    R-Drop (Liang et al., 2021) runs the batch twice in one forward (two dropout masks) and adds
    `rdrop_alpha` x the mean of KL(p1||p2) and KL(p2||p1) to the mean cross-entropy of the two passes.
    """
    if not label_smoothing and not rdrop_alpha:
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not rdrop_alpha:
        return F.cross_entropy(model(**inputs).logits.float(), labels, label_smoothing=label_smoothing)
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    first, second = model(**doubled).logits.float().chunk(2)
    ce = (F.cross_entropy(first, labels, label_smoothing=label_smoothing)
          + F.cross_entropy(second, labels, label_smoothing=label_smoothing)) / 2
    return ce + rdrop_alpha * symmetric_kl(first, second)


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2, averaged over the batch."""
    log_p, log_q = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return (kl_pq + kl_qp) / 2
