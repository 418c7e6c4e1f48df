"""Multi-process (DDP) runs: which process writes, and passes over data shared among the processes.

With ``trainer=ddp`` every process runs the whole experiment: Lightning's launcher re-runs the command for
ranks ``1..N-1`` at the first ``fit`` (SLURM or ``torchrun`` start them all at once). Training is Lightning's
DDP. The passes over data outside ``fit`` (features for prototypes and class statistics, EWC/MAS importance,
evaluation) split the *batches* of the one-process pass among the processes and gather the results, so
every process ends with what one process computes from the same batches (up to the order of float sums),
in a fraction of the time. Only rank 0 writes files and logs to W&B.

Before Lightning has set up the process group (or in a run without ``fit``) everything here is the
one-process case: no sharding, no collectives.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

T = TypeVar("T")

#: Environment variables that name a process's global rank, in the order Lightning reads them.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
#: Set by rank 0 for the processes Lightning launches: the run folder and whether it is being resumed.
RUN_DIR_VARIABLE = "CL_BENCH_RUN_DIR"
RESUMED_VARIABLE = "CL_BENCH_RESUMED"


def active() -> bool:
    """Whether a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank in the process group (0 when there is none)."""
    return dist.get_rank() if active() else 0


def launch_rank() -> int:
    """This process's global rank as its launcher set it, known before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def is_main_process() -> bool:
    """Rank 0: the process that writes results, checkpoints and W&B logs."""
    return launch_rank() == 0


def local_rank() -> int:
    """This process's index on its machine (its GPU)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def launched_externally() -> bool:
    """Whether a launcher outside Lightning started several processes (``torchrun``, SLURM ``srun``)."""
    return (
        any(name in os.environ for name in ("RANK", "LOCAL_RANK"))
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )


def batch_shard(dataset: Dataset, batch_size: int) -> list[list[int]] | None:
    """This process's share of the batches of an unshuffled pass: batches ``rank, rank + N, ...`` of the
    one-process pass (``None`` when there is one process: use an ordinary loader)."""
    if not active():
        return None
    batches = list(BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
    return batches[rank() :: world_size()]


def shard_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """An unshuffled loader over this process's :func:`batch_shard` (every batch in a one-process run)."""
    batches = batch_shard(dataset, batch_size)
    if batches is None:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory
        )
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory)


def gather_batches(local: list[T]) -> list[T]:
    """Every process's per-batch results of a :func:`batch_shard` pass, in the one-process batch order."""
    if not active():
        return local
    shares: list[Any] = [None] * world_size()
    dist.all_gather_object(shares, local)
    total = sum(len(share) for share in shares)
    return [shares[i % len(shares)][i // len(shares)] for i in range(total)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (returned for convenience)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Integer counts (e.g. correct predictions) summed over the processes, key by key."""
    if not active():
        return counts
    shares: list[Any] = [None] * world_size()
    dist.all_gather_object(shares, counts)
    total: dict[str, int] = {}
    for share in shares:
        for key, value in share.items():
            total[key] = total.get(key, 0) + value
    return total
