"""Cross-convolution BatchNorm (Xconv BN) and per-task BatchNorm snapshots (ConFiT, Jie et al. 2022).

Jie, Deng, Li, "Alleviating Representational Shift for Continual Fine-tuning", CVPRW 2022
(arXiv 2204.10535), abstract: Xconv BN "maintains pre-convolution running means instead of
post-convolution, and recovers post-convolution ones before testing". The details follow the official code
(``JieShibo/ConFiT`` @9a396b1, ``stat_tracker.py`` and ``main.py`` l.76-149):

* For every BatchNorm fed directly by a convolution, an EMA (the BN's momentum, 0.1) of the per-channel
  mean of the conv's **input** is kept during training. Convolutions of stride ``s`` keep ``s*s`` means,
  one per phase ``(row mod s, col mod s)`` of the input lattice (the code does this for stride 2, so that
  the 1x1 stride-2 downsample conv is recovered exactly; other strides are our generalisation).
* Before testing an old task ``i``, the conv, **with its current weights**, is applied to a map of the
  conv's input size filled with task ``i``'s stored means (per phase), and the spatial mean of its output
  becomes the BN's running mean: ``mu_hat = mean_p Conv_T(M_i)[:, p]``. Running the real conv handles
  stride, zero padding, dilation, groups and bias. The running variance is *not* recovered (it is restored
  from the task's snapshot), as in the code.
* The recovery is exact when the input mean is constant per phase (always for 1x1 unpadded convs);
  elsewhere border effects make it approximate (``shared/research/methods_cnn.md`` §1.10).

Conv -> BN pairs are found by a probe forward pass: a BN is paired with a conv when its input tensor *is*
that conv's output (nothing in between). BNs fed by anything else (a sum, an activation) keep the task's
stored mean, and :class:`XconvBatchNorm` lists them in ``unpaired``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cl_bench.modules.precision import float32

log = logging.getLogger(__name__)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class PhaseMeanTracker(nn.Module):
    """EMA of the per-channel mean of a conv's input, one per stride phase (``stride_h * stride_w`` rows).

    ``update`` is called on the conv's input in training mode only (the official stride-2 trackers also
    update on test batches, a bug the spec notes; ours do not).
    """

    def __init__(self, channels: int, stride: tuple[int, int], momentum: float = 0.1) -> None:
        super().__init__()
        self.stride = (int(stride[0]), int(stride[1]))
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(self.stride[0] * self.stride[1], channels))
        #: Spatial size (H, W) of the conv's input; (0, 0) until the first update.
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the batch's per-phase channel means of ``x`` (N, C, H, W) into the running means."""
        size = torch.tensor(x.shape[-2:])
        if bool(self.input_size.any()) and not torch.equal(self.input_size.cpu(), size):
            raise RuntimeError(
                f"Xconv BN needs a fixed input resolution: a conv saw {tuple(self.input_size.tolist())} "
                f"and now {tuple(size.tolist())}. Use one input size for training (transform.input_size)."
            )
        self.input_size.copy_(size)
        sh, sw = self.stride
        phase_means = torch.stack(
            [
                x[:, :, r::sh, c::sw].to(self.running_mean.dtype).mean(dim=(0, 2, 3))
                for r in range(sh)
                for c in range(sw)
            ]
        )
        self.running_mean.mul_(1.0 - self.momentum).add_(phase_means, alpha=self.momentum)

    def mean_map(self) -> torch.Tensor:
        """The conv's input map of the tracked means (see :func:`phase_mean_map`)."""
        if not bool(self.input_size.any()):
            raise RuntimeError("the tracker has not seen any training batch yet")
        return phase_mean_map(self.running_mean, tuple(self.input_size.tolist()), self.stride)


def phase_mean_map(
    phase_means: torch.Tensor, input_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """A (1, C, H, W) map holding, at each position, the mean of its phase ``(h mod sh, w mod sw)``.

    ``phase_means`` is (sh * sw, C), row ``r * sw + c`` for phase ``(r, c)``.
    """
    height, width = input_size
    sh, sw = stride
    phase = (torch.arange(height)[:, None] % sh) * sw + (torch.arange(width)[None, :] % sw)
    return phase_means[phase.to(phase_means.device)].permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def recover_post_conv_mean(conv: nn.Conv2d, input_mean_map: torch.Tensor) -> torch.Tensor:
    """Xconv recovery: the spatial mean of ``conv`` applied to the stored input-mean map (one per channel),
    in float32 (float64 for a float64 conv) whatever the autocast or the conv's dtype
    (:mod:`cl_bench.modules.precision`); returned in the conv's dtype."""
    weight = conv.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    with float32(weight.device):
        out = conv._conv_forward(input_mean_map.to(weight.device, dtype), weight.to(dtype), bias)
        return out.mean(dim=(0, 2, 3)).to(weight.dtype)


@dataclass
class ConvBNPair:
    """A BatchNorm and the convolution whose output it normalises directly."""

    conv_name: str
    bn_name: str


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[ConvBNPair], list[str]]:
    """Conv -> BN pairs of ``model`` (found with one eval-mode forward of ``example``) and unpaired BNs."""
    names = {module: name for name, module in model.named_modules()}
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    pairs: dict[str, str] = {}
    seen_bns: list[str] = []

    def after_conv(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        outputs[id(output)] = (output, names[module])

    def before_bn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen_bns.append(names[module])
        match = outputs.get(id(args[0]))
        if match is not None and match[0] is args[0]:
            pairs[names[module]] = match[1]

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, BATCH_NORMS):
            handles.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    all_bns = [name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    paired = [ConvBNPair(conv, bn) for bn, conv in pairs.items()]
    unpaired = [name for name in all_bns if name not in pairs]
    return paired, unpaired


class TrackConvInput:
    """Forward pre-hook of a convolution: feeds its input to the tracker in train mode (a class rather than a
    closure, so that a method holding it can be pickled into a run checkpoint)."""

    def __init__(self, tracker: PhaseMeanTracker) -> None:
        self.tracker = tracker

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            self.tracker.update(args[0])


class XconvBatchNorm(nn.Module):
    """Per-task BN snapshots with (optional) Xconv recovery of old tasks' BN means, for any CNN.

    ``attach`` finds the conv -> BN pairs of ``model`` and starts tracking pre-conv means;
    ``snapshot(task)`` stores every BN's weight, bias, running mean and variance and the tracked means after
    a task; ``load(task, recover)`` restores task ``task``'s BN state and, with ``recover``, replaces the
    running means of paired BNs by the Xconv estimate under the model's current conv weights.

    The trackers and snapshots are buffers / extra state of this module, so they are in checkpoints.
    The model itself is referenced, not registered, so its parameters are not counted twice.

    Args:
        model: the network holding the convs and BNs.
        example: an input batch of the training resolution for the probe pass that finds the pairs.
        track: keep pre-conv means (Xconv); ``False`` stores per-task BN state only.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, track: bool = True) -> None:
        super().__init__()
        self._model = [model]  # a list: not registered as a submodule
        pairs, self.unpaired = find_conv_bn_pairs(model, example)
        self.pairs = pairs if track else []
        self.trackers = nn.ModuleDict()
        self._hooks = []
        modules = dict(model.named_modules())
        self.bn_names = [name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
        for pair in self.pairs:
            conv, bn = modules[pair.conv_name], modules[pair.bn_name]
            momentum = bn.momentum
            if momentum is None:
                raise ValueError(f"Xconv BN needs an EMA momentum; {pair.bn_name} uses a cumulative average")
            tracker = PhaseMeanTracker(conv.in_channels, conv.stride, momentum)
            self.trackers[self._key(pair.conv_name)] = tracker
            self._hooks.append(conv.register_forward_pre_hook(TrackConvInput(tracker)))
        if track and self.unpaired:
            log.warning(
                "Xconv BN: %d BatchNorm layer(s) do not follow a convolution directly and keep their "
                "task's stored running mean: %s",
                len(self.unpaired),
                self.unpaired,
            )
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self._recovered: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def _batch_norms(self) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        modules = dict(self.model.named_modules())
        for name in self.bn_names:
            yield name, modules[name]

    # ------------------------------------------------------------------ snapshots
    def current_state(self) -> dict[str, torch.Tensor]:
        """Copies of every BN's affine parameters and running statistics and of the tracked means."""
        state: dict[str, torch.Tensor] = {}
        for name, bn in self._batch_norms():
            for field in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(bn, field)
                if value is not None:
                    state[f"{name}.{field}"] = value.detach().clone()
        for key, tracker in self.trackers.items():
            state[f"tracker:{key}"] = tracker.running_mean.detach().clone()
        return state

    def snapshot(self, task: int) -> None:
        """Store the state after training ``task`` (tasks are snapshotted in order 0, 1, ...)."""
        if task != len(self.snapshots):
            raise ValueError(f"snapshot of task {task} but {len(self.snapshots)} task(s) are stored")
        self.snapshots.append(self.current_state())
        self._recovered.clear()

    def forget_recoveries(self) -> None:
        """Drop cached recovered means (the conv weights are about to change)."""
        self._recovered.clear()

    @torch.no_grad()
    def _write(self, state: dict[str, torch.Tensor]) -> None:
        for name, bn in self._batch_norms():
            for field in ("weight", "bias", "running_mean", "running_var"):
                target = getattr(bn, field)
                if target is not None:
                    target.copy_(state[f"{name}.{field}"])
        for key, tracker in self.trackers.items():
            tracker.running_mean.copy_(state[f"tracker:{key}"])

    @torch.no_grad()
    def recovered_means(self, task: int) -> dict[str, torch.Tensor]:
        """Xconv estimates of the paired BNs' running means for ``task`` under the current conv weights."""
        if task not in self._recovered:
            modules = dict(self.model.named_modules())
            state = self.snapshots[task]
            means = {}
            for pair in self.pairs:
                key = self._key(pair.conv_name)
                tracker = self.trackers[key]
                size = tuple(tracker.input_size.tolist())
                input_map = phase_mean_map(state[f"tracker:{key}"], size, tracker.stride)
                means[pair.bn_name] = recover_post_conv_mean(modules[pair.conv_name], input_map)
            self._recovered[task] = means
        return self._recovered[task]

    @torch.no_grad()
    def load(self, task: int, recover: bool) -> None:
        """Restore task ``task``'s BN state; with ``recover``, Xconv-recover the paired BNs' means."""
        self._write(self.snapshots[task])
        if recover:
            modules = dict(self.model.named_modules())
            for bn_name, mean in self.recovered_means(task).items():
                modules[bn_name].running_mean.copy_(mean)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.snapshots = list(state["snapshots"])
        self._recovered.clear()
