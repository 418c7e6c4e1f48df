"""The run's device, mixed precision and memory figures."""

from __future__ import annotations

import resource

import torch

from cl_bench import distributed
from cl_bench.errors import ConfigError


def select_device(accelerator: str) -> torch.device:
    """The device for task-end work and evaluation (Lightning places the model itself during ``fit``);
    under DDP each process's own GPU."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu"
            )
        return torch.device("cuda", distributed.local_rank())
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    if accelerator in ("auto", "cpu"):
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator!r}: use auto, cpu or gpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference passes for ``trainer.precision`` (``None``: full precision)."""
    if device.type != "cuda":
        return None
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size (Linux: KiB).

    The CPU figure is the process's peak since it started: in a multirun whose jobs share one process
    (Hydra's basic launcher) a job reports at least the peak of the jobs before it.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count of a CUDA device afresh (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
