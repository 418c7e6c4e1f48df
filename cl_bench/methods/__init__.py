"""Continual methods: one LightningModule file each, selected by ``cl_bench/conf/method/NAME.yaml``
(``_target_``), beside the parts only that method uses (``norm_sets``/``task_keys``: LayerNorm tuning,
``xconv_bn``: ConFiT, ``input_transforms``: input tuning, ``lora``/``losses``: SLCA++, ``first_session``:
RanPAC and APER). The contract a method implements: ``README.md`` here and :mod:`cl_bench.methods.base`."""

from cl_bench.methods.base import Capabilities, ContinualModule, HeadTraining, Phase, Prediction, TaskContext

__all__ = ["Capabilities", "ContinualModule", "HeadTraining", "Phase", "Prediction", "TaskContext"]
