"""Float32 islands: computations that make a decision or an exact recovery run in float32 whatever the
trainer's mixed precision (``trainer.precision=bf16-mixed`` wraps training and evaluation in autocast).

Under autocast a matrix product or convolution of float32 inputs still runs in bfloat16 (8 mantissa bits):
the cosine scores of task-key selection, ConFiT's Xconv recovery of BatchNorm means (exact in float32 for
1x1 convolutions, ~0.3 % off in bfloat16), RanPAC/SAFE ridge solves and projections and class statistics
would then change with the precision. :func:`float32` switches autocast off for a block; the code inside
casts its inputs with ``.float()``. Float64 computations are never autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def float32(device: torch.device | str) -> Iterator[None]:
    """Autocast off on ``device``'s type inside the block (cast inputs with ``.float()`` in it)."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield
