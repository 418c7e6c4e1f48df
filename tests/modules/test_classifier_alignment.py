"""Classifier Alignment (cl_bench/modules/classifier_alignment.py): the per-task logit normalisation and the
SLCA / SLCA++ old-class scalings follow their formulas, CA fixes a head biased towards the newest task,
trains every head parameter but restores the requires_grad flags, and is repeatable from its generator."""

from __future__ import annotations

import torch
from torch import nn

from cl_bench.modules.class_statistics import ClassStatistics
from cl_bench.modules.classifier_alignment import (
    ClassifierAlignment,
    random_feature_scales,
    slca_mean_scales,
    task_normalized_logits,
)
from cl_bench.modules.heads import IncrementalLinearHead

DIM, TASK_SIZES = 6, [2, 2]


def test_task_normalized_logits_divide_by_the_mean_per_task_norm() -> None:
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0, 0.0]])  # task norms 5 and 1 -> mean 3
    out = task_normalized_logits(logits, [2, 3], temperature=0.1)
    torch.testing.assert_close(out, logits / ((5 + 1e-7 + 1 + 1e-7) / 2 * 0.1))
    global_norm = logits.norm()
    assert not torch.allclose(out, logits / (global_norm * 0.1))


def test_slca_mean_scales() -> None:
    scales = slca_mean_scales(torch.tensor([0, 1, 2]), current_task=2)
    torch.testing.assert_close(scales, torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0], dtype=torch.float64))


def test_random_feature_scales_shrink_old_tasks_within_the_jitter() -> None:
    tasks = torch.tensor([0] * 1000 + [2] * 10)
    scales = random_feature_scales(tasks, 2, mu=0.02, jitter=0.02, generator=torch.Generator().manual_seed(0))
    old = scales[:1000]
    assert old.min() >= 1 / (1 + 0.03 * 2) - 1e-6 and old.max() <= 1 / (1 + 0.01 * 2) + 1e-6
    assert old.std() > 0 and torch.equal(scales[1000:], torch.ones(10))


def _statistics() -> ClassStatistics:
    """Four well-separated classes in 6-d."""
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.eye(DIM)[:4]
    feats = torch.cat([c + 0.5 * torch.randn(50, DIM, generator=gen) for c in centres])
    stats = ClassStatistics()
    stats.update(feats, torch.arange(4).repeat_interleave(50))
    return stats


def _biased_head() -> IncrementalLinearHead:
    """Task 0's block knows nothing; task 1's block claims everything (a new-task bias)."""
    torch.manual_seed(0)
    head = IncrementalLinearHead(DIM)
    for size in TASK_SIZES:
        head.add_task(size)
    with torch.no_grad():
        head.blocks[0].weight.zero_()
        head.blocks[0].bias.zero_()
        head.blocks[1].bias.fill_(5.0)
    head.blocks[0].requires_grad_(False)  # an old, frozen head
    return head


def _accuracy(head: nn.Module, stats: ClassStatistics) -> float:
    x, y = stats.sample(range(4), 200, torch.Generator().manual_seed(123))
    return (head(x).argmax(1) == y).float().mean().item()


def test_alignment_fixes_a_biased_head_and_restores_the_flags() -> None:
    stats, head = _statistics(), _biased_head()
    assert _accuracy(head, stats) <= 0.5
    ca = ClassifierAlignment(epochs=5, samples_per_class=256, batch_size=64, lr=0.1, logit_norm=0.1)
    losses = ca.align(head, stats, range(4), TASK_SIZES, torch.Generator().manual_seed(0))
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert _accuracy(head, stats) > 0.95
    assert [b.weight.requires_grad for b in head.blocks] == [False, True]
    assert all(p.grad is None for p in head.parameters())
    assert head.blocks[0].weight.abs().sum() > 0  # the frozen old block was aligned too


def test_alignment_is_repeatable_and_uses_the_scalings() -> None:
    stats = _statistics()
    ca = ClassifierAlignment(epochs=2, samples_per_class=32, batch_size=64, logit_norm=None)
    heads = [_biased_head() for _ in range(3)]
    ca.align(heads[0], stats, range(4), TASK_SIZES, torch.Generator().manual_seed(7))
    ca.align(heads[1], stats, range(4), TASK_SIZES, torch.Generator().manual_seed(7))
    seen = []

    def scaler(labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels)
        return torch.full(labels.shape, 0.5)

    ca.align(
        heads[2],
        stats,
        range(4),
        TASK_SIZES,
        torch.Generator().manual_seed(7),
        mean_scales=torch.tensor([0.9, 0.9, 1.0, 1.0]),
        feature_scaler=scaler,
    )
    assert all(
        torch.equal(a, b) for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values())
    )
    assert not torch.equal(heads[0].blocks[1].weight, heads[2].blocks[1].weight)
    assert len(seen) == 2 and sorted(seen[0].tolist()) == sorted(list(range(4)) * 32)
