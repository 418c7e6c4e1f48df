"""Building an experiment from its config: data, scenario, backbone, method, per-task datasets, evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cl_bench import debug
from cl_bench.config import TrainerConfig, build_from_config
from cl_bench.data.base import ClassificationData, TaskDataset
from cl_bench.data.batch_transforms import BatchAugment, build_input_pipeline
from cl_bench.devices import autocast_dtype, reset_peak_memory, select_device
from cl_bench.evaluation import Evaluator
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.scenario import Scenario, Task, build_scenario
from cl_bench.threads import configure_threads, local_processes
from cl_bench.validation import validate_data


@dataclass
class Experiment:
    """Everything a run builds from its config before the first task."""

    data: ClassificationData
    method: ContinualModule
    #: The tasks the method learns (one merged task for ``single_task`` methods).
    scenario: Scenario
    train_sets: list[TaskDataset]
    train_eval_sets: list[TaskDataset]
    test_sets: list[TaskDataset]
    evaluator: Evaluator
    device: torch.device
    autocast_dtype: torch.dtype | None
    trainer: TrainerConfig
    seed: int

    def task_context(self, task: Task) -> TaskContext:
        """What the method may use while learning ``task``."""
        return TaskContext(
            task=task,
            scenario=self.scenario,
            train_set=self.train_sets[task.index],
            train_eval_set=self.train_eval_sets[task.index],
            num_workers=self.trainer.num_workers,
            eval_batch_size=self.trainer.eval_batch_size,
            seed=self.seed,
            autocast_dtype=self.autocast_dtype,
            drop_last=self.trainer.drop_last,
        )


def task_datasets(
    data: ClassificationData,
    scenario: Scenario,
    train_tf: Any,
    eval_tf: Any,
    batch_tf: BatchAugment | None = None,
) -> tuple[list[TaskDataset], list[TaskDataset], list[TaskDataset]]:
    """Per task: train images (train transform), the same with the eval transform, and test images: those of
    the task's classes, and under DIL only those of the task's domain."""
    label_map = scenario.label_map
    train, train_eval, test = [], [], []
    for task in scenario.tasks:
        classes = np.asarray(task.original_classes)
        train_idx = np.flatnonzero(np.isin(data.train.labels, classes))
        test_idx = np.flatnonzero(np.isin(data.test.labels, classes))
        if task.domain is not None:
            train_idx = np.intersect1d(train_idx, data.domain_indices("train", task.domain))
            test_idx = np.intersect1d(test_idx, data.domain_indices("test", task.domain))
        train.append(TaskDataset(data.train, train_idx, label_map, train_tf, batch_tf))
        train_eval.append(TaskDataset(data.train, train_idx, label_map, eval_tf))
        test.append(TaskDataset(data.test, test_idx, label_map, eval_tf))
    return train, train_eval, test


def build_experiment(cfg: DictConfig) -> Experiment:
    """Data, backbone, method, scenario, transforms, datasets and evaluator of ``cfg``, in that order (the
    order draws the same random numbers in every run of the config)."""
    trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)  # type: ignore[assignment]
    trainer.num_workers = configure_threads(
        trainer.threads, trainer.concurrent_jobs, trainer.num_workers, local_processes(trainer)
    ).num_workers
    data: ClassificationData = build_from_config("dataset", cfg.dataset)
    data.name = cfg.dataset.get("name", data.name)
    data = debug.subset_per_class(data, cfg.debug.samples_per_class)
    backbone = debug.build_backbone(cfg)
    transform_cfg = debug.shrink_input(backbone, cfg.transform, cfg.debug.input_size)
    method: ContinualModule = build_from_config("method", cfg.method, backbone=backbone)
    split = debug.first_tasks(
        build_scenario(cfg.scenario, data.num_classes, data.domain_names, data.name), cfg.debug.max_tasks
    )
    scenario = split.merged() if method.capabilities.single_task else split
    validate_data(data, scenario)
    device = select_device(trainer.accelerator)
    pipeline = build_input_pipeline(backbone.data_config, transform_cfg, data, device)
    method.batch_transform = pipeline.batch
    train_tf, eval_tf = pipeline.train, pipeline.eval
    train_sets, train_eval_sets, test_sets = task_datasets(data, scenario, train_tf, eval_tf, pipeline.batch)
    reset_peak_memory(device)
    amp_dtype = autocast_dtype(trainer.precision, device)
    evaluator = Evaluator(
        scenario,
        debug.limit_eval(test_sets, trainer.limit_eval_batches, trainer.eval_batch_size),
        batch_size=trainer.eval_batch_size,
        num_workers=trainer.num_workers,
        autocast_dtype=amp_dtype,
        til_tasks=split,
    )
    return Experiment(
        data=data,
        method=method,
        scenario=scenario,
        train_sets=train_sets,
        train_eval_sets=train_eval_sets,
        test_sets=test_sets,
        evaluator=evaluator,
        device=device,
        autocast_dtype=amp_dtype,
        trainer=trainer,
        seed=cfg.seed,
    )


def tracker_config(cfg: DictConfig, config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config plus flat top-level fields to filter runs by on a dashboard."""
    return {
        **config,
        "dataset_name": cfg.dataset.get("name"),
        "method_name": cfg.method.get("name"),
        "backbone_name": cfg.backbone.get("name"),
        "scenario_type": str(cfg.scenario.type),
        "order_seed": cfg.scenario.order_seed,
        "seed": cfg.seed,
    }
