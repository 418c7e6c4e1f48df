"""RanPAC's ridge head equals the closed-form ridge least-squares solution; lambda selection follows its 80/20
rule; statistics accumulate over tasks or in another head; the cosine head grows as PyCIL's update_fc."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench.errors import ConfigError
from cl_bench.modules.analytic_heads import (
    CosineLinear,
    RandomProjectionRidgeHead,
    ridge_grid,
    select_ridge,
)


def _data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _closed_form(h: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||H W - Y||^2 + ridge ||W||^2 by least squares on [H; sqrt(ridge) I] W = [Y; 0]."""
    a = np.vstack([h, np.sqrt(ridge) * np.eye(h.shape[1])])
    b = np.vstack([y, np.zeros((h.shape[1], y.shape[1]))])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def test_ridge_head_equals_the_closed_form_over_two_tasks() -> None:
    torch.manual_seed(0)
    head = RandomProjectionRidgeHead(6, rp_dim=20, ridges=[0.1, 1.0, 10.0])
    features, labels = [], []
    for task, (lo, hi) in enumerate([(0, 3), (3, 5)]):
        f, y = _data(40, 6, hi - lo, seed=task)
        head.add_task(hi - lo)
        ridge = head.fit(f, y + lo, generator=torch.Generator().manual_seed(task))
        features.append(f)
        labels.append(y + lo)
    h = torch.relu(torch.cat(features) @ head.projection).double().numpy()
    y = F.one_hot(torch.cat(labels), 5).double().numpy()
    np.testing.assert_allclose(head.weight.numpy(), _closed_form(h, y, ridge), rtol=2e-3, atol=2e-4)
    x = torch.randn(4, 6)
    torch.testing.assert_close(head(x), torch.relu(x @ head.projection) @ head.weight.T)


def test_lambda_is_the_grid_point_of_smallest_validation_mse() -> None:
    f, y = _data(50, 8, 4, seed=3)
    onehot = F.one_hot(y, 4).float()
    grid = ridge_grid(-2, 3)
    assert grid == [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    h, v = f[:40].double().numpy(), f[40:].double().numpy()
    mse = [
        np.mean((v @ _closed_form(h, onehot[:40].double().numpy(), r).T - onehot[40:].numpy()) ** 2)
        for r in grid
    ]
    assert select_ridge(f, onehot, grid) == grid[int(np.argmin(mse))]


def test_no_projection_and_shared_statistics() -> None:
    f, y = _data(30, 5, 3, seed=4)
    plain = RandomProjectionRidgeHead(5, rp_dim=0, ridges=[1.0])
    plain.add_task(3)
    plain.fit(f, y)
    np.testing.assert_allclose(
        plain.weight.numpy(),
        _closed_form(f.double().numpy(), F.one_hot(y, 3).double().numpy(), 1.0),
        atol=1e-4,
    )
    owner = RandomProjectionRidgeHead(5, rp_dim=0, ridges=[1.0])
    borrower = RandomProjectionRidgeHead(5, rp_dim=0, ridges=[1.0])
    for head in (owner, borrower):
        head.add_task(3)
    owner.fit(f, y)
    borrower.fit(2 * f, y, statistics=owner)
    assert borrower.gram.numel() == 0  # holds no statistics of its own
    stacked = torch.cat([f, 2 * f]).double().numpy()
    expected = _closed_form(stacked, F.one_hot(torch.cat([y, y]), 3).double().numpy(), 1.0)
    np.testing.assert_allclose(borrower.weight.numpy(), expected, atol=1e-4)


def test_state_dict_round_trip_restores_grown_buffers() -> None:
    f, y = _data(30, 5, 3, seed=5)
    head = RandomProjectionRidgeHead(5, rp_dim=7, ridges=[1.0])
    head.add_task(3)
    head.fit(f, y)
    fresh = RandomProjectionRidgeHead(5, rp_dim=7, ridges=[1.0])
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(f), head(f))


def test_cosine_head_grows_with_zero_rows_and_keeps_sigma() -> None:
    head = CosineLinear(4, sigma=10.0)
    head.add_task(2)
    old = head.weight.detach().clone()
    with torch.no_grad():
        head.sigma.fill_(3.0)
    head.add_task(3, init="zeros")
    assert head.num_classes == 5 and torch.equal(head.weight[:2], old) and not head.weight[2:].any()
    x = torch.randn(6, 4)
    expected = 3.0 * F.normalize(x, dim=1) @ F.normalize(old, dim=1).T
    torch.testing.assert_close(head(x)[:, :2], expected)
    assert not head(x)[:, 2:].any()


def test_invalid_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="rp_dim"):
        RandomProjectionRidgeHead(4, rp_dim=-1)
    with pytest.raises(ConfigError, match="first must be"):
        ridge_grid(3, 1)
    with pytest.raises(ConfigError, match="validation"):
        select_ridge(torch.randn(1, 3), torch.ones(1, 2), [1.0])
