"""A tiny timm ViT and two clearly separated tasks for the tests of the ViT continual methods (L2P,
DualPrompt, CODA-Prompt, EASE): building blocks, not tests."""

from __future__ import annotations

import torch
from helpers import learn, task_context, toy_scenario
from torch.utils.data import TensorDataset

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.scenario import Scenario

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
#: ``run_tiny`` overrides for the same ViT on fake 16 px data (2 tasks of the digits-sized fake set).
RUN_OVERRIDES = (
    "dataset=fake",
    "dataset.image_size=16",
    "transform.input_size=16",
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "backbone.model_kwargs={img_size:16,patch_size:8,depth:3,embed_dim:32,num_heads:2}",
)


def tiny_vit(seed: int = 0) -> TimmBackbone:
    torch.manual_seed(seed)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)


def scenario(sizes: tuple[int, ...] = (3, 3)) -> Scenario:
    return toy_scenario(sizes)


def task_data(task: int, n_per_class: int = 16, seed: int = 0) -> TensorDataset:
    """Task 0 bright, task 1 dark images; the class within a task by a colour tint."""
    generator = torch.Generator().manual_seed(seed * 10 + task)
    labels = torch.arange(task * 3, task * 3 + 3).repeat_interleave(n_per_class)
    tint = torch.eye(3)[labels % 3].view(-1, 3, 1, 1)
    brightness = 2.0 if task == 0 else -2.0
    images = brightness + 1.5 * tint + 0.3 * torch.randn(len(labels), 3, 16, 16, generator=generator)
    return TensorDataset(images, labels)


def context(task: int, tasks: Scenario, data: TensorDataset) -> TaskContext:
    return task_context(tasks, task, data)


def fit(module: ContinualModule, ctx: TaskContext) -> None:
    """One task as the runner does it (start hook, the method's phases, end hook)."""
    learn(module, ctx)


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def same(a, b) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
