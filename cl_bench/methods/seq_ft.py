"""Sequential fine-tuning: the lower-bound baseline of every continual fine-tuning paper.

The whole network (backbone and a linear head grown by one block per task) is trained with cross-entropy on
each task in turn, with no measure against forgetting ("Finetune" in PyCIL/LAMDA-PILOT, "Seq FT" in SLCA,
Zhang et al. 2023, Table 1). It is :class:`~cl_bench.methods.base.ContinualModule` as it stands; the
defaults (SGD, momentum 0.9, weight decay 5e-4, cosine schedule, ``loss_scope=seen`` as PyCIL's Finetune)
are in ``cl_bench/conf/method/seq_ft.yaml``.

Under ``scenario=dil`` the head covers every class from the first domain on and the whole network is trained
on each domain in turn (the usual DIL lower bound).
"""

from __future__ import annotations

from cl_bench.methods.base import Capabilities, ContinualModule


class SequentialFineTuning(ContinualModule):
    """Full fine-tuning of backbone and head on each task in sequence (see module docstring)."""

    CAPABILITIES = Capabilities(domain_incremental=True)
