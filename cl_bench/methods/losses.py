"""Classification losses beyond plain cross-entropy.

Symmetric cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV
2019, Eq. 6-8), used by SLCA++ (Zhang et al., arXiv 2408.08295) to stabilise the slow learner::

    SCE = alpha * CE(p, y) + beta * RCE,   RCE = -sum_k p_k * log(q_k),

with ``p = clamp(softmax(z), min_prob, 1)`` and ``q = clamp(onehot(y), min_label_prob, 1)``. Since
``log q_k`` is 0 for ``k = y`` and ``log(min_label_prob)`` otherwise, ``RCE = -log(min_label_prob) *
sum_{k != y} p_k``, i.e. ``A * (1 - p_y)`` with ``A = -log(1e-4) = 9.21`` when no ``p_k`` is clamped. The
clamps (1e-7 and 1e-4) are the official code's (``GengDavid/SLCA`` ``models/slca_pp.py::_run``) and Wang et
al.'s (``A = log(1e-4)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reverse_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, min_prob: float = 1e-7, min_label_prob: float = 1e-4
) -> torch.Tensor:
    """``mean_b -sum_k clamp(p_bk, min_prob, 1) * log(clamp(onehot_bk, min_label_prob, 1))``."""
    probs = F.softmax(logits.float(), dim=1).clamp(min=min_prob, max=1.0)
    one_hot = F.one_hot(targets, logits.shape[1]).to(probs).clamp(min=min_label_prob, max=1.0)
    return -(probs * one_hot.log()).sum(dim=1).mean()


def symmetric_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
    min_prob: float = 1e-7,
    min_label_prob: float = 1e-4,
) -> torch.Tensor:
    """``alpha * CE + beta * RCE`` averaged over the batch (defaults: SLCA++'s CIFAR/CUB ``(1.0, 0.1)``)."""
    ce = F.cross_entropy(logits.float(), targets)
    return alpha * ce + beta * reverse_cross_entropy(logits, targets, min_prob, min_label_prob)
