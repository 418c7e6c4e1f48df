"""Float32 islands (cl_bench/modules/precision.py): under CPU autocast to bfloat16 the task-key selection,
Xconv recovery, ridge fits and logits, class-statistics samples and prototype scores equal their float32
results exactly, while the same products left to autocast would not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.methods.task_keys import TaskKeys
from cl_bench.methods.xconv_bn import phase_mean_map, recover_post_conv_mean
from cl_bench.modules.analytic_heads import RandomProjectionRidgeHead
from cl_bench.modules.class_statistics import ClassStatistics
from cl_bench.modules.heads import PrototypeHead


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_autocast_would_change_a_float32_matmul() -> None:
    """The premise: without an island, autocast runs these products in bfloat16."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g)
    reference = a @ b
    with _bf16():
        mixed = a @ b
    assert mixed.dtype == torch.bfloat16 and not torch.equal(mixed.float(), reference)


def test_task_key_selection_is_float32_under_autocast() -> None:
    torch.manual_seed(0)
    keys = TaskKeys(32, 3)
    for _ in range(3):
        keys.add_key()
    queries = torch.randn(64, 32)
    # near-ties between keys 0 and 1: bfloat16 scores would pick the wrong one for some rows
    queries = queries + 50 * (keys.keys[0] + keys.keys[1]).detach()
    reference, chosen = keys.similarity(queries), keys.select(queries)
    with _bf16():
        assert torch.equal(keys.similarity(queries), reference)
        assert torch.equal(keys.select(queries), chosen)
        assert keys.pull_loss(queries, 1).dtype == torch.float32
        naive = F.normalize(queries, dim=-1) @ F.normalize(keys.stacked(), dim=-1).T
    assert not torch.equal(naive.float(), reference)


def test_xconv_recovery_is_float32_and_exact_for_1x1_under_autocast() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1, stride=2, bias=True)
    means = torch.randn(4, 16)  # one per stride phase
    mean_map = phase_mean_map(means, (6, 6), (2, 2))
    reference = recover_post_conv_mean(conv, mean_map)
    exact = conv.weight[:, :, 0, 0] @ means[0] + conv.bias  # stride 2 from (0, 0) samples phase (0, 0) only
    torch.testing.assert_close(reference, exact.detach(), rtol=1e-6, atol=1e-6)
    with _bf16():
        assert torch.equal(recover_post_conv_mean(conv, mean_map), reference)
        naive = conv(mean_map).mean(dim=(0, 2, 3))
    assert not torch.equal(naive.float(), reference)


def test_ridge_fit_and_logits_are_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, 16, generator=g), torch.arange(40) % 4

    def fitted(autocast: bool) -> tuple[RandomProjectionRidgeHead, torch.Tensor]:
        head = RandomProjectionRidgeHead(16, 64, [0.1, 1.0, 10.0], generator=torch.Generator().manual_seed(1))
        head.add_task(4)
        with _bf16() if autocast else torch.autocast("cpu", enabled=False):
            head.fit(features, labels, generator=torch.Generator().manual_seed(2))
            return head, head(features)

    reference, logits = fitted(False)
    head, mixed = fitted(True)
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.gram, reference.gram)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, logits)


def test_class_statistics_samples_are_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    stats = ClassStatistics()
    stats.update(torch.randn(30, 8, generator=g), torch.arange(30) % 2)
    reference, _ = stats.sample([0, 1], 16, torch.Generator().manual_seed(3))
    with _bf16():
        samples, _ = stats.sample([0, 1], 16, torch.Generator().manual_seed(3))
    assert samples.dtype == torch.float32 and torch.equal(samples, reference)


def test_prototype_scores_are_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    head = PrototypeHead(32)
    head.add_task(5)
    head.set_prototypes(torch.arange(5), torch.randn(5, 32, generator=g))
    x = torch.randn(20, 32, generator=g)
    reference = head(x)
    with _bf16():
        assert torch.equal(head(x), reference)
