"""Debug runs and the trainer knobs behind them, all from config.

* ``debug=smoke`` (``cl_bench/conf/debug/smoke.yaml``): one epoch of two batches per training phase (each
  Lightning fit of a task) on two images per class at 32 px, no model files; checks that a preset runs end
  to end.
  ``results.json`` says so (``config.debug.smoke``) and ``cl-bench-report`` leaves smoke runs out of its
  tables.
* ``debug.samples_per_class``: the first N train and N test images of each class (:func:`subset_per_class`).
* ``debug.max_tasks``: only the first N tasks (:func:`first_tasks`).
* ``debug.method_caps``: upper bounds on the method's sizes (batch size, random-projection width, buffer,
  ...) for the keys the method has (:func:`cap_method`), so that a smoke run of a ViT-B preset is small.
* ``debug.input_size``: images of at most this side, the preset's train recipe kept and a ViT set to that
  resolution (:func:`shrink_input`).
* ``debug.random_weights_if_missing`` (smoke runs only): nothing is downloaded, and a backbone whose weights
  are not on this machine starts from random weights (:func:`build_backbone`).
* ``trainer.max_epochs``, ``trainer.limit_train_batches``, ``trainer.limit_eval_batches``,
  ``trainer.gradient_clip_val``/``gradient_clip_algorithm``, ``trainer.accumulate_grad_batches`` and
  ``trainer.profiler`` (:func:`trainer_options`, :func:`limit_eval`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_bench.backbones.base import Backbone
from cl_bench.data.base import ClassificationData, ImageSource, TaskDataset
from cl_bench.errors import CheckpointError, ConfigError
from cl_bench.scenario import Scenario

log = logging.getLogger(__name__)

PROFILERS = ("simple", "advanced", "pytorch")


def check_options(cfg: DictConfig) -> None:
    """Reject bad debug and trainer knob values, naming the key, before anything is built."""
    t = cfg.trainer
    limit = t.limit_train_batches
    if limit is not None and (
        isinstance(limit, bool)
        or not isinstance(limit, int | float)
        or limit <= 0
        or (isinstance(limit, float) and limit > 1.0)
    ):
        raise ConfigError(
            f"trainer.limit_train_batches={limit!r}: give a number of batches (an integer >= 1) or a "
            "fraction of the loader in (0, 1], or null for all"
        )
    for key in ("max_epochs", "limit_eval_batches", "accumulate_grad_batches"):
        if t[key] is not None and t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be at least 1 (or null)")
    if t.gradient_clip_val is not None and t.gradient_clip_val <= 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={t.gradient_clip_val} must be > 0 (or null: no clipping)"
        )
    if t.gradient_clip_algorithm not in ("norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={t.gradient_clip_algorithm!r}: use norm or value")
    if t.profiler is not None and t.profiler not in PROFILERS:
        raise ConfigError(f"trainer.profiler={t.profiler!r}: use {', '.join(PROFILERS)} or null")
    d = cfg.debug
    for key in ("samples_per_class", "max_tasks", "input_size"):
        if d[key] is not None and d[key] < 1:
            raise ConfigError(f"debug.{key}={d[key]} must be at least 1 (or null: all)")
    for key, cap in d.method_caps.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ConfigError(f"debug.method_caps.{key}={cap!r} must be an integer >= 0")
    if d.smoke:
        log.warning("SMOKE RUN (debug=smoke): a check that the run goes end to end, its numbers mean nothing")
    if d.random_weights_if_missing and not d.smoke:
        raise ConfigError(
            "debug.random_weights_if_missing=true is for smoke runs only (debug=smoke): a real run with "
            "random weights would look like a result"
        )


def trainer_options(trainer_cfg: Any, epochs: int, run_dir: Path, name: str) -> dict[str, Any]:
    """Keyword arguments of a phase's ``pl.Trainer`` from ``trainer_cfg`` (a ``TrainerConfig``): ``epochs``
    capped by ``trainer.max_epochs``, the batch limit, clipping, accumulation, and the profiler (its report
    named ``name``). Lightning refuses clipping and accumulation for a module that steps its optimizers
    itself (manual optimization), naming the key."""
    t = trainer_cfg
    options: dict[str, Any] = {"max_epochs": min(epochs, t.max_epochs or epochs)}
    if t.limit_train_batches is not None:
        options["limit_train_batches"] = t.limit_train_batches
    if t.gradient_clip_val is not None:
        options["gradient_clip_val"] = t.gradient_clip_val
        options["gradient_clip_algorithm"] = t.gradient_clip_algorithm
    if t.accumulate_grad_batches > 1:
        options["accumulate_grad_batches"] = t.accumulate_grad_batches
    if t.profiler is not None:
        options["profiler"] = make_profiler(t.profiler, run_dir / "profiler", name)
    return options


def make_profiler(name: str, folder: Path, filename: str) -> Any:
    """Lightning's ``simple``/``advanced`` profiler (a report in ``folder/<stage>-<filename>.txt``) or the
    PyTorch profiler (its summary there too, and a Chrome trace to open in chrome://tracing or Perfetto)."""
    from pytorch_lightning import profilers

    folder.mkdir(parents=True, exist_ok=True)
    if name == "simple":
        return profilers.SimpleProfiler(dirpath=folder, filename=filename)
    if name == "advanced":
        return profilers.AdvancedProfiler(dirpath=folder, filename=filename)
    return profilers.PyTorchProfiler(dirpath=folder, filename=filename, export_to_chrome=True)


class SubsetImages:
    """Some images of an :class:`ImageSource`, in the given order (an ``ImageSource`` itself)."""

    def __init__(self, images: ImageSource, indices: np.ndarray) -> None:
        self.base = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = images.labels[self.indices]
        self.source = f"{images.source} (subset of {len(self.indices)})"

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> torch.Tensor:
        return self.base.image(int(self.indices[index]))


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` images of every class, in their original order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts
    return np.sort(order[rank < n])


def subset_per_class(data: ClassificationData, n: int | None) -> ClassificationData:
    """``data`` with only the first ``n`` train and ``n`` test images of each class, of each domain if the
    dataset has domains (``None``: unchanged)."""
    if n is None:
        return data
    chosen = {}
    for split in ("train", "test"):
        labels, domains = getattr(data, split).labels, getattr(data, f"{split}_domains")
        groups = labels if domains is None else domains * data.num_classes + labels  # (domain, class)
        chosen[split] = first_per_class(groups, n)
    train = SubsetImages(data.train, chosen["train"])
    test = SubsetImages(data.test, chosen["test"])
    log.info("debug.samples_per_class=%d: %d train and %d test images", n, len(train), len(test))
    if data.domain_names is None:
        return replace(data, train=train, test=test)
    assert data.train_domains is not None and data.test_domains is not None
    return replace(
        data,
        train=train,
        test=test,
        train_domains=data.train_domains[chosen["train"]],
        test_domains=data.test_domains[chosen["test"]],
    )


def first_tasks(scenario: Scenario, n: int | None) -> Scenario:
    """``scenario`` cut to its first ``n`` tasks and their classes (``None``: unchanged)."""
    if n is None or n >= len(scenario.tasks):
        return scenario
    tasks = scenario.tasks[:n]
    log.info("debug.max_tasks=%d: learning %d of %d tasks", n, n, len(scenario.tasks))
    return replace(scenario, class_order=scenario.class_order[: tasks[-1].stop], tasks=tasks)


def cap_method(cfg: DictConfig) -> DictConfig:
    """``cfg`` with each ``debug.method_caps`` key that the method has lowered to the cap (a copy; ``cfg``
    itself when nothing changes). Caps of keys the method lacks are ignored: one list fits every method."""
    lowered = {
        key: cap
        for key, cap in cfg.debug.method_caps.items()
        if isinstance(cfg.method.get(key), int)
        and not isinstance(cfg.method.get(key), bool)
        and cfg.method[key] > cap
    }
    if not lowered:
        return cfg
    log.info(
        "debug.method_caps: %s", ", ".join(f"method.{k}={cfg.method[k]} -> {v}" for k, v in lowered.items())
    )
    capped = copy.deepcopy(cfg)
    with open_dict(capped):
        capped.method.merge_with(lowered)
    return capped


def limit_eval(test_sets: Sequence[TaskDataset], n_batches: int | None, batch_size: int) -> list[TaskDataset]:
    """Each task's test set cut to at most ``n_batches * batch_size`` images, spread evenly over the set so
    every class keeps some (``None``: unchanged)."""
    if n_batches is None:
        return list(test_sets)
    limited = []
    for ds in test_sets:
        keep = n_batches * batch_size
        if len(ds) > keep:
            ds = copy.copy(ds)
            chosen = np.linspace(0, len(ds.indices) - 1, keep).round().astype(np.int64)
            ds.indices, ds.targets = ds.indices[chosen], ds.targets[chosen]
        limited.append(ds)
    return limited


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub downloads off: weights already in the local cache load, missing ones fail at once
    (without it an unreachable hub is retried with back-off for about 45 s before failing)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing to download from
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def build_backbone(cfg: DictConfig) -> Any:
    """The backbone of ``cfg``; with ``debug.random_weights_if_missing`` (smoke runs) nothing is downloaded
    and a backbone whose weights are not on this machine (no file, not in the Hugging Face cache) is built
    again with random weights (``pretrained=false``, ``checkpoint=null``), loudly."""
    from cl_bench.config import build_from_config

    try:
        with hub_offline() if cfg.debug.random_weights_if_missing else contextlib.nullcontext():
            return build_from_config("backbone", cfg.backbone)
    except CheckpointError as exc:
        if not cfg.debug.random_weights_if_missing:
            raise
        keys = {k: v for k, v in (("pretrained", False), ("checkpoint", None)) if k in cfg.backbone}
        log.warning("SMOKE RUN WITH RANDOM BACKBONE WEIGHTS: %s", exc)
        return build_from_config("backbone", OmegaConf.merge(cfg.backbone, keys))


def shrink_input(backbone: Backbone, transform_cfg: DictConfig, size: int | None) -> DictConfig:
    """Lower the run's input side to ``size`` (``debug.input_size``; ``None`` or not smaller: unchanged).

    The backbone takes the new side: a ViT through timm's ``set_input_size`` (its position embedding
    resampled to the smaller patch grid, the side rounded up to a whole number of patches), a CNN as it is.
    Returns the ``transform`` config to build the pipelines from: the preset's train recipe (``auto``
    resolved at the preset's size, so the same augmentation runs) with its resize sides scaled alike."""
    from cl_bench.config import TrainAugment
    from cl_bench.data.transforms import resolve_augment

    full = transform_cfg.input_size or backbone.data_config.input_size
    if size is None or full <= size:
        return transform_cfg
    model = getattr(backbone, "model", backbone)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:  # a transformer whose patch grid is fixed at construction
        if not hasattr(model, "set_input_size"):
            log.warning(
                "debug.input_size=%d: %s cannot change its input size; kept at %d px",
                size,
                type(model).__name__,
                full,
            )
            return transform_cfg
        patch = int(patch_embed.patch_size[0])
        size = -(-size // patch) * patch
        model.set_input_size(img_size=(size, size))
    backbone.data_config = replace(backbone.data_config, input_size=size)

    def scaled(side: int | None) -> int | None:
        return None if side is None else max(size, round(side * size / full))

    shrunk = copy.deepcopy(transform_cfg)
    with open_dict(shrunk):
        shrunk.train = resolve_augment(TrainAugment(shrunk.train), full).value
        shrunk.input_size = size
        shrunk.train_resize = scaled(transform_cfg.train_resize)
        shrunk.eval_resize = scaled(transform_cfg.eval_resize)
    log.info("debug.input_size: inputs of %d px instead of %d (train recipe %s)", size, full, shrunk.train)
    return shrunk
