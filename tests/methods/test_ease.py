"""EASE (Zhou et al., CVPR 2024; cl_bench/methods/ease.py)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tiny_vit_tasks import RUN_OVERRIDES, context, fit, same, scenario, snapshot, task_data, tiny_vit

from cl_bench.errors import ConfigError
from cl_bench.methods.ease import EASE, complement_prototypes, reweighted_logits, subspace_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")


def test_complement_reproduces_a_hand_computed_case() -> None:
    old_in_old = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    new_in_old = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # cosines: [[1, 0], [0, 1]]
    new_in_new = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    e = math.e
    expected = torch.tensor([[2 * e / (e + 1), 4 / (e + 1)], [2 / (e + 1), 4 * e / (e + 1)]])
    torch.testing.assert_close(complement_prototypes(old_in_old, new_in_old, new_in_new), expected)


def test_subspace_weights_follow_forward_reweight() -> None:
    weights = subspace_weights(torch.tensor([0, 1, 2]), 3, current_task=2, alpha=0.1, beta=0.0, offset=0)
    torch.testing.assert_close(weights, torch.tensor([[1, 0.05, 0.05], [0.05, 1, 0.05], [0.05, 0.05, 1]]))
    with_ptm = subspace_weights(torch.tensor([0, 1]), 3, current_task=1, alpha=0.1, beta=0.5, offset=1)
    torch.testing.assert_close(with_ptm, torch.tensor([[0.5, 1, 0.1], [0.5, 0.1, 1]]))
    assert subspace_weights(torch.tensor([0]), 1, current_task=0, alpha=0.1, beta=0, offset=0).tolist() == [
        [1.0]
    ]


def test_reweighted_logits_sum_weighted_cosines_per_subspace() -> None:
    torch.manual_seed(0)
    features, prototypes, weights = torch.randn(4, 3, 5), torch.randn(2, 3, 5), torch.rand(2, 3)
    expected = torch.tensor(
        [
            [
                sum(
                    float(weights[c, s] * F.cosine_similarity(features[b, s], prototypes[c, s], dim=0))
                    for s in range(3)
                )
                for c in range(2)
            ]
            for b in range(4)
        ]
    )
    torch.testing.assert_close(
        reweighted_logits(features, prototypes, weights), expected, rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def two_tasks() -> dict:
    pl.seed_everything(0, verbose=False)
    module = EASE(tiny_vit(), adapter_bottleneck=8, epochs=2, batch_size=16, lr=0.05)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items() if ".adapters." not in k}
    tasks = scenario()
    fit(module, context(0, tasks, task_data(0)))
    first = (
        snapshot(p for bank in module.banks for p in bank.adapters[0].parameters()),
        module.prototypes.clone(),
    )
    fit(module, context(1, tasks, task_data(1)))
    return {"module": module, "frozen": frozen, "first": first, "scenario": tasks}


def test_frozen_parts_stay_bit_identical_and_each_task_trains_its_adapter(two_tasks: dict) -> None:
    module = two_tasks["module"]
    state = module.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in two_tasks["frozen"].items())
    adapters_0 = [p for bank in module.banks for p in bank.adapters[0].parameters()]
    assert same(adapters_0, two_tasks["first"][0])
    assert any(bank.adapters[1].up.weight.abs().sum() > 0 for bank in module.banks)  # moved from zero
    assert not any(p.requires_grad for p in module.parameters())


def test_prototypes_are_class_means_per_subspace_and_old_ones_are_complemented(two_tasks: dict) -> None:
    module = two_tasks["module"].eval()
    assert module.prototypes.shape == (6, 2, 32) and module.class_tasks.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(
        module.prototypes[:3, 0], two_tasks["first"][1][:, 0]
    )  # unchanged in its subspace
    data = task_data(1)
    with torch.no_grad():
        features = module.subspace_features(data.tensors[0])
    for c in range(3, 6):
        torch.testing.assert_close(
            module.prototypes[c], features[data.tensors[1] == c].mean(0), rtol=1e-4, atol=1e-5
        )
    expected = complement_prototypes(
        module.prototypes[:3, 0], module.prototypes[3:, 0], module.prototypes[3:, 1]
    )
    torch.testing.assert_close(module.prototypes[:3, 1], expected)


def test_prediction_uses_every_subspace(two_tasks: dict) -> None:
    module = two_tasks["module"].eval()
    x = task_data(0, n_per_class=2, seed=3).tensors[0]
    with torch.no_grad():
        prediction = module.predict(x)
        logits, chosen = prediction.logits, prediction.chosen_task
        weights = subspace_weights(module.class_tasks, 2, 1, module.alpha, module.beta, 0)
        expected = reweighted_logits(module.subspace_features(x), module.prototypes, weights)
    torch.testing.assert_close(logits, expected)
    assert chosen is None and logits.shape == (6, 6)


def test_a_new_adapter_leaves_the_pretrained_model_unchanged() -> None:
    module = EASE(tiny_vit()).eval()
    x = task_data(0)[:3][0]
    with torch.no_grad():
        plain = tiny_vit()(x)
        module.on_task_start(context(0, scenario(), task_data(0)))
        torch.testing.assert_close(module.subspace_features(x)[:, 0], plain)
    EASE(tiny_vit(), use_init_ptm=True)  # builds


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="loss_scope"):
        EASE(tiny_vit(), loss_scope="seen")
    with pytest.raises(ConfigError, match="adapter_bottleneck"):
        EASE(tiny_vit(), adapter_bottleneck=0)


def test_runner_runs_it_deterministically(run_tiny) -> None:
    overrides = (
        *RUN_OVERRIDES,
        "method=ease",
        "method.epochs=1",
        "method.batch_size=8",
        "method.use_init_ptm=true",
        "method.beta=1.0",
    )
    first, _ = run_tiny(*overrides)
    second, _ = run_tiny(*overrides)
    assert first["status"] == "complete" and first["acc_matrix"] == second["acc_matrix"]
