"""Joint training: the upper bound, one task of all classes trained at once (no continual constraint)."""

from __future__ import annotations

from cl_bench.methods.base import Capabilities
from cl_bench.methods.seq_ft import SequentialFineTuning


class JointTraining(SequentialFineTuning):
    """Fine-tunes backbone and head on the union of all tasks' data as a single task.

    The runner collapses the scenario into one task (same class order), so ``acc_matrix`` has one row and
    ``last_acc`` is directly comparable with the continual methods' ``last_acc``; forgetting and BWT are
    undefined (``null``) for a single task.
    """

    CAPABILITIES = Capabilities(single_task=True)
