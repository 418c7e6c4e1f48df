"""Continual methods: one LightningModule file each, selected by ``cl_bench/conf/method/NAME.yaml`` (``_target_``)."""

from cl_bench.methods.base import ContinualModule, TaskContext

__all__ = ["ContinualModule", "TaskContext"]
