"""Training on cached features without a Lightning fit: the head-only fast path.

A phase that trains only small parameters (a linear head, a classifier alignment) on a tensor of cached
features does milliseconds of arithmetic per epoch, while a Lightning ``Trainer.fit`` costs seconds of
set-up per task (issue 19: linear_probe spent 5-8 s per task in framework overhead). :func:`fit_on_features`
runs the loop that Lightning's automatic optimisation runs for such a module, with the module's own
``configure_optimizers`` and ``training_step``: per batch zero the gradients, the step under the trainer's
autocast, backward, optimiser step (a per-step scheduler steps here); a per-epoch scheduler steps after
each epoch. Like Lightning's fit, it leaves every submodule's train/eval mode as it finds it. The loader is
the one the runner would give Lightning (same sampler and generator), so the batch order, and with it the
result, is the same as a ``Trainer.fit`` on one process (a test pins equal weights).

Scope: modules whose training uses ``training_step``, ``configure_optimizers`` and at most
``on_train_epoch_start`` (no other Lightning hooks, no manual optimisation, one optimiser), on one process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

#: Lightning's warning for ``self.log`` outside a trainer; the loop reports epoch losses itself.
_LOG_WITHOUT_TRAINER = ".*self.log\\(\\)` but the `self.trainer` reference is not registered.*"


def _optimizer_and_scheduler(
    config: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None, str]:
    """Lightning's ``configure_optimizers`` forms with one optimiser: optimiser, ``(optimiser, scheduler,
    interval)``; a bare scheduler steps per epoch, as in Lightning."""
    if isinstance(config, torch.optim.Optimizer):
        return config, None, "epoch"
    if isinstance(config, dict) and isinstance(config.get("optimizer"), torch.optim.Optimizer):
        scheduler = config.get("lr_scheduler")
        if scheduler is None:
            return config["optimizer"], None, "epoch"
        if isinstance(scheduler, dict):
            return config["optimizer"], scheduler["scheduler"], scheduler.get("interval", "epoch")
        return config["optimizer"], scheduler, "epoch"
    raise TypeError(
        "fit_on_features supports configure_optimizers returning one optimiser or {'optimizer', "
        f"'lr_scheduler'}}; got {type(config).__name__}"
    )


def fit_on_features(
    module: pl.LightningModule,
    loader: DataLoader,
    epochs: int,
    autocast_dtype: torch.dtype | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``module`` for ``epochs`` epochs over ``loader`` as Lightning's fit would (module docstring).

    Args:
        module: a LightningModule on its training device.
        loader: the training loader (cached features and labels).
        epochs: epochs to run (Lightning's ``max_epochs``).
        autocast_dtype: the trainer's mixed-precision dtype (``bf16-mixed`` -> ``torch.bfloat16``); float16
            also scales the loss as Lightning's ``16-mixed`` does.
        on_epoch_end: called with ``(epoch, mean loss)`` after each epoch.

    Returns:
        the mean training loss of each epoch.
    """
    device = next(module.parameters()).device
    optimizer, scheduler, interval = _optimizer_and_scheduler(module.configure_optimizers())
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    cast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast(device.type, dtype=autocast_dtype)
    )
    epoch_losses: list[float] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOG_WITHOUT_TRAINER)
        for epoch in range(epochs):
            module.on_train_epoch_start()  # the one hook besides the two below, as Lightning calls it
            total, count = torch.zeros((), device=device), 0
            for batch_idx, batch in enumerate(loader):
                batch = [t.to(device, non_blocking=True) for t in batch]
                optimizer.zero_grad(set_to_none=True)
                with cast:
                    loss = module.training_step(batch, batch_idx)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if scheduler is not None and interval == "step":
                    scheduler.step()
                total += loss.detach() * len(batch[-1])
                count += len(batch[-1])
            if scheduler is not None and interval == "epoch":
                scheduler.step()
            epoch_losses.append(float(total) / max(count, 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch, epoch_losses[-1])
    return epoch_losses
