"""The evaluator: CIL/TIL accuracy, task-aware masking, and the frozen-feature cache."""

from __future__ import annotations

import torch

from cl_bench.config import ScenarioConfig, ScenarioType
from cl_bench.evaluation import Evaluator
from cl_bench.scenario import build_scenario


def test_til_mask_uses_each_images_original_task_for_joint_training() -> None:
    split = build_scenario(ScenarioConfig(type=ScenarioType.til, n_tasks=2, order_seed=None), 4)
    merged = split.merged()
    evaluator = Evaluator(merged, [], til_tasks=split)
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0], [9.0, 0.0, 1.0, 2.0]])
    y = torch.tensor([1, 3])  # task 0 = positions {0, 1}; task 1 = {2, 3}
    masked = evaluator._within_task(logits, y)
    assert masked.argmax(dim=1).tolist() == [1, 3]  # CIL argmax would be [2, 0]
    assert torch.isinf(masked[0, 2:]).all() and torch.isinf(masked[1, :2]).all()


def test_til_mask_defaults_to_the_scenarios_tasks() -> None:
    split = build_scenario(ScenarioConfig(n_tasks=2, order_seed=None), 4)
    evaluator = Evaluator(split, [])
    assert evaluator.task_range.tolist() == [[0, 2], [0, 2], [2, 4], [2, 4]]
