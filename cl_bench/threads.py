"""CPU threads of a run (``trainer.threads``): torch's intra-op pool, OpenMP/BLAS pools and data workers.

Several runs on one machine (a local ``-m`` sweep, several sessions) each default to every core, so their
thread pools oversubscribe the cores and identical epochs take anywhere between 1x and 15x as long (issue
19). A run therefore takes ``trainer.threads`` threads; ``null`` means the ``OMP_NUM_THREADS`` of the
environment when set, else the cores this process may use (its affinity, within a SLURM job's
``SLURM_CPUS_PER_TASK``) divided by ``trainer.concurrent_jobs`` (which ``launcher=local`` sets to its
``n_jobs``; joblib's negative ``n_jobs`` count back from the core count; ``launcher=submitit_local``, whose
jobs all start at once, sets ``trainer.threads`` to its ``cpus_per_task`` instead) and by the run's DDP
processes on this machine that Lightning starts (they inherit rank 0's thread variables).
The number is applied to torch (``torch.set_num_threads``), to the OpenMP/BLAS pools already loaded
(threadpoolctl), to the environment that child processes inherit (DDP processes, data workers), and it caps
the data workers (``trainer.num_workers``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from cl_bench.config import TrainerConfig
from cl_bench.distributed import launched_externally
from cl_bench.errors import ConfigError

log = logging.getLogger(__name__)

#: Environment variables that size the OpenMP/BLAS pools of processes started later.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    num_workers: int


def available_cores() -> int:
    """The cores this process may run on: its affinity mask, and in a SLURM job at most the job's
    ``SLURM_CPUS_PER_TASK`` (a node that does not pin jobs to cores shows them all of its cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(allocated)) if allocated.isdigit() and int(allocated) >= 1 else cores


def concurrent_runs(concurrent_jobs: int, cores: int) -> int:
    """Runs at once: ``concurrent_jobs``, with joblib's convention for negative values (-1: one per core)."""
    return concurrent_jobs if concurrent_jobs >= 1 else max(1, cores + 1 + concurrent_jobs)


def local_processes(trainer: TrainerConfig) -> int:
    """The processes of this run on this machine that share its cores: ``trainer.devices`` when Lightning
    starts them (DDP); 1 when ``torchrun`` or ``srun`` started each with its own share, or one device."""
    if launched_externally():
        return 1
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        if int(devices) >= 1:
            return int(devices)
    if trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():  # -1 / "auto": all GPUs
        return max(1, torch.cuda.device_count())
    return 1


def resolve_threads(threads: int | None, concurrent_jobs: int, processes: int = 1) -> int:
    """``trainer.threads`` made concrete (module docstring); ``processes``: this run's processes on this
    machine (:func:`local_processes`), which share the default's cores."""
    if concurrent_jobs == 0:
        raise ConfigError(
            "trainer.concurrent_jobs=0 means no run at all: give the runs sharing the cores (>= 1; joblib's "
            "negative counts, -1 = one per core, also work)"
        )
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"trainer.threads={threads} must be >= 1 (or null: cores / concurrent jobs)")
        return threads
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) >= 1:
        return int(from_env)
    cores = available_cores()
    return max(1, cores // (concurrent_runs(concurrent_jobs, cores) * processes))


def configure_threads(
    threads: int | None, concurrent_jobs: int, num_workers: int, processes: int = 1
) -> ThreadPlan:
    """Apply the run's thread count (per process) to torch, OpenMP/BLAS and child processes; the data
    workers it allows."""
    n = resolve_threads(threads, concurrent_jobs, processes)
    torch.set_num_threads(n)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # optional: torch's own pool and the environment are set anyway
        pass
    workers = min(num_workers, n)
    if workers < num_workers:
        log.warning(
            "trainer.num_workers=%d exceeds this run's %d threads (trainer.threads): using %d data workers",
            num_workers,
            n,
            workers,
        )
    log.info("%d CPU threads (torch, OpenMP/BLAS), %d data workers", n, workers)
    return ThreadPlan(n, workers)
