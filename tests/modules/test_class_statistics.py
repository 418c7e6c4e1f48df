"""Class statistics (cl_bench/modules/class_statistics.py): the stored moments are numpy's mean and
unbiased covariance (+ shrink * I), sampling reproduces them and is repeatable from a seeded generator,
and degenerate inputs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.modules.class_statistics import ClassStatistics


def _features(n_per_class: int = 40, dim: int = 5, classes=(3, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(n_per_class, dim, generator=gen) @ torch.randn(dim, dim, generator=gen) + 2 * c
        for c in classes
    ]
    labels = torch.tensor(classes).repeat_interleave(n_per_class)
    return torch.cat(feats), labels


def test_statistics_equal_numpy_mean_and_covariance() -> None:
    features, labels = _features()
    stats = ClassStatistics(covariance_shrink=1e-4)
    assert stats.update(features, labels) == [3, 7]
    assert stats.classes == [3, 7] and len(stats) == 2
    for cls in (3, 7):
        x = features[labels == cls].double().numpy()
        np.testing.assert_allclose(stats.means[cls].numpy(), x.mean(axis=0), rtol=1e-5, atol=1e-5)
        expected = np.cov(x, rowvar=False) + 1e-4 * np.eye(x.shape[1])
        np.testing.assert_allclose(stats.covariances[cls].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert stats.means[cls].dtype == torch.float32 and stats.covariances[cls].device.type == "cpu"


def test_old_classes_keep_their_statistics_when_new_ones_arrive() -> None:
    features, labels = _features()
    stats = ClassStatistics()
    stats.update(features[labels == 3], labels[labels == 3])
    mean_3 = stats.means[3].clone()
    stats.update(features[labels == 7] + 100, labels[labels == 7])
    assert torch.equal(stats.means[3], mean_3) and stats.classes == [3, 7]


def test_sampling_reproduces_the_stored_moments() -> None:
    features, labels = _features()
    stats = ClassStatistics()
    stats.update(features, labels)
    samples, sample_labels = stats.sample([7, 3], 40_000, torch.Generator().manual_seed(1))
    assert samples.shape == (80_000, 5) and samples.dtype == torch.float32
    assert sample_labels.tolist() == [7] * 40_000 + [3] * 40_000
    for cls in (3, 7):
        x = samples[sample_labels == cls].double()
        scale = stats.covariances[cls].diagonal().sqrt().double()
        assert ((x.mean(0) - stats.means[cls].double()).abs() / scale).max() < 0.03
        rel = (torch.cov(x.T) - stats.covariances[cls].double()).abs() / (scale[:, None] * scale[None, :])
        assert rel.max() < 0.04


def test_sampling_is_repeatable_and_mean_scales_move_only_the_mean() -> None:
    features, labels = _features()
    stats = ClassStatistics()
    stats.update(features, labels)
    a, _ = stats.sample([3, 7], 16, torch.Generator().manual_seed(5))
    b, _ = stats.sample([3, 7], 16, torch.Generator().manual_seed(5))
    c, _ = stats.sample([3, 7], 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    scales = torch.tensor([0.5, 1.0])
    d, _ = stats.sample([3, 7], 16, torch.Generator().manual_seed(5), mean_scales=scales)
    torch.testing.assert_close(d[:16] - a[:16], (-0.5 * stats.means[3]).expand(16, -1))
    torch.testing.assert_close(d[16:], a[16:])


def test_bad_input_fails_clearly() -> None:
    stats = ClassStatistics()
    with pytest.raises(ConfigError, match="at least 2"):
        stats.update(torch.randn(3, 4), torch.tensor([0, 0, 1]))
    with pytest.raises(ConfigError, match="NaN"):
        stats.update(torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long))
    with pytest.raises(KeyError, match="no statistics"):
        stats.sample([9], 4, torch.Generator())
    with pytest.raises(ConfigError, match="covariance_shrink"):
        ClassStatistics(covariance_shrink=-1.0)


def test_a_covariance_float32_cannot_factorise_is_sampled_through_float64() -> None:
    """Two images of a class in 768-d with a large spread (a smoke run's random ViT-B): the stored float32
    covariance is rank one plus 1e-4 * I, too ill-conditioned for a float32 Cholesky; sampling still works
    and follows the stored covariance along its one large direction."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        features = 30 * torch.randn(2, 768, generator=gen)
        stats = ClassStatistics()
        stats.update(features, torch.tensor([0, 0]))
        if torch.linalg.cholesky_ex(stats.covariances[0])[1].item() != 0:
            break
    else:
        pytest.fail("no draw made the float32 Cholesky fail: the premise of this test does not hold")
    samples, _ = stats.sample([0], 20_000, torch.Generator().manual_seed(1))
    assert torch.isfinite(samples).all()
    direction = (features[1] - features[0]).double()
    direction /= direction.norm()
    along = (samples.double() - stats.means[0].double()) @ direction
    expected = direction @ stats.covariances[0].double() @ direction
    assert abs(along.var() / expected - 1) < 0.05
