"""Symmetric cross-entropy (cl_bench/methods/losses.py) matches its formula: alpha * CE + beta * RCE with
RCE = -sum_k clamp(p_k) log clamp(onehot_k) = -log(1e-4) * (1 - p_y) away from the clamps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cl_bench.methods.losses import reverse_cross_entropy, symmetric_cross_entropy


def test_reverse_ce_is_a_times_one_minus_p_y() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.randint(0, 4, (6,))
    p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(reverse_cross_entropy(logits, targets), (-math.log(1e-4) * (1 - p_y)).mean())


def test_symmetric_ce_matches_the_elementwise_definition() -> None:
    torch.manual_seed(1)
    logits, targets = 8 * torch.randn(5, 3), torch.randint(0, 3, (5,))  # some probabilities hit the clamp
    p = F.softmax(logits, dim=1).clamp(1e-7, 1.0)
    q = F.one_hot(targets, 3).float().clamp(1e-4, 1.0)
    rce = -(p * q.log()).sum(1).mean()
    ce = -F.log_softmax(logits, dim=1).gather(1, targets[:, None]).mean()
    torch.testing.assert_close(symmetric_cross_entropy(logits, targets, 0.5, 0.5), 0.5 * ce + 0.5 * rce)
    torch.testing.assert_close(
        symmetric_cross_entropy(logits, targets, 1.0, 0.0), F.cross_entropy(logits, targets)
    )


def test_reverse_ce_vanishes_for_confident_correct_predictions() -> None:
    targets = torch.tensor([0, 2])
    logits = 50 * F.one_hot(targets, 3).float()
    assert reverse_cross_entropy(logits, targets).item() < 1e-5
    assert reverse_cross_entropy(-logits, targets).item() > 9.0  # p_y ~ 0: close to -log(1e-4)
