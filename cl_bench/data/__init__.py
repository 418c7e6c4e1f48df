"""Datasets: each loader returns a :class:`ClassificationData` (train/test images, labels, class names).

A new dataset is one loader function (any module) plus one ``cl_bench/conf/dataset/NAME.yaml`` naming it with
``_target_``.
"""

from cl_bench.data.base import ArrayImages, ClassificationData, TaskDataset

__all__ = ["ArrayImages", "ClassificationData", "TaskDataset"]
