"""Benchmark: what input-space tuning costs on one task, against seq_ft and linear_probe.

Marullo et al. (arXiv 2306.02947) claim input-space tuning is cheap enough for the edge. For the first task
of a config this measures, for ``input_tuning`` with each transformation family, ``seq_ft`` and
``linear_probe`` (each with its ``cl_bench/conf/method`` defaults, batch size included):

* ``trainable_params``: parameters with ``requires_grad`` once the task's head (and transformation) exist;
* ``setup_s``: the task-start work before the first step (``train_dataset``: linear_probe embeds the
  task's training images there once);
* ``step_s`` (median) and ``data_s`` (mean): one forward/backward/optimizer step, and fetching one batch;
  ``epoch_s_est = steps_per_epoch * (mean step + data)`` and ``task_s_est = setup_s + epochs * epoch_s_est``
  at the method's configured epochs;
* memory. On CUDA, ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` over the steps. Everywhere, an
  accounting of what a training step holds (``mem_mb``), because a CPU process's resident size mixes in
  the allocator, the data and the libraries: ``weights_mb`` (parameters and buffers, frozen or not),
  ``grads_mb`` (one gradient per trainable parameter), ``optimizer_mb`` (the optimizer's state tensors),
  ``activations_mb`` (the largest, over steps, total size of the distinct tensors autograd saves for the
  backward pass, counted with ``torch.autograd.graph.saved_tensors_hooks``; weights it saves are not
  counted twice) and ``train_set_mb`` (cached features held by linear_probe). Transient buffers of the
  backward pass are not counted, so ``mem_mb`` is a lower bound that ranks the methods fairly. (Autograd
  saves a convolution's and a BatchNorm's input even when their weights are frozen, so back-propagating
  to the input saves as much as full fine-tuning does.)
* ``loss_first``/``loss_last`` (mean of the first and last 5 steps) and ``acc_task0``: accuracy on the
  task's test images after the measured steps, a sanity check only (not a converged result).

The training loop is plain PyTorch (the method's ``training_step`` and optimizer, no Lightning), the
scheduler is not stepped. With no overrides it runs offline on random images and a random ResNet-20. One
task of Split CIFAR-100 from the CIFAR-10 ResNet-32::

    .venv/bin/python scripts/bench_input_tuning.py --steps 40 --out bench_input_tuning.json -- \
        experiment=cifar100_resnet32 paths.data_dir=../shared/data \
        backbone.checkpoint=../shared/weights/cifar10_akamaster_resnet32-d509ac18.th
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import TensorDataset

import cl_bench.config  # noqa: F401  (registers the schemas)
from cl_bench.config import build_from_config, validate_config
from cl_bench.data.transforms import build_transforms
from cl_bench.devices import select_device
from cl_bench.evaluation import Evaluator
from cl_bench.experiment import task_datasets
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.scenario import build_scenario

CONF_DIR = Path(__file__).resolve().parent.parent / "cl_bench" / "conf"
#: Label -> method overrides of the compared variants.
VARIANTS: dict[str, list[str]] = {
    "input_tuning/additive": ["method=input_tuning", "method.transform=additive"],
    "input_tuning/padding": ["method=input_tuning", "method.transform=padding"],
    "input_tuning/residual_conv": ["method=input_tuning", "method.transform=residual_conv"],
    "seq_ft": ["method=seq_ft"],
    "linear_probe": ["method=linear_probe"],
}
DEFAULT_OVERRIDES = ["dataset=fake", "dataset.train_per_class=64", "scenario.n_tasks=2"]
MB = 2**20

warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference.*")


class SavedTensorMeter:
    """Total bytes of the distinct storages autograd saves during one step (``saved_tensors_hooks``)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step_bytes(self) -> int:
        total = sum(self.storages.values())
        self.storages.clear()
        return total


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build(overrides: list[str], run_dir: str) -> tuple[ContinualModule, TaskContext, Evaluator, torch.device]:
    """The method, the first task's context and an evaluator for it, as the runner builds them."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.run_dir={run_dir}", "logger.mode=disabled"])
    validate_config(cfg)
    torch.manual_seed(cfg.seed)
    data = build_from_config("dataset", cfg.dataset)
    backbone = build_from_config("backbone", cfg.backbone)
    method: ContinualModule = build_from_config("method", cfg.method, backbone=backbone)
    scenario = build_scenario(cfg.scenario, data.num_classes)
    train_tf, eval_tf = build_transforms(backbone.data_config, cfg.transform, data.hflip_invariant)
    train_sets, train_eval_sets, test_sets = task_datasets(data, scenario, train_tf, eval_tf)
    device = select_device(cfg.trainer.accelerator)
    task = scenario.tasks[0]
    ctx = TaskContext(
        task=task,
        scenario=scenario,
        train_set=train_sets[0],
        train_eval_set=train_eval_sets[0],
        num_workers=cfg.trainer.num_workers,
        eval_batch_size=cfg.trainer.eval_batch_size,
        seed=cfg.seed,
    )
    evaluator = Evaluator(scenario, test_sets[:1], batch_size=cfg.trainer.eval_batch_size)
    return method, ctx, evaluator, device


def measure(overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Trainable parameters, memory and time of ``steps`` training steps on the first task."""
    with tempfile.TemporaryDirectory() as run_dir:
        method, ctx, evaluator, device = build(overrides, run_dir)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    method.on_task_start(ctx)
    method.to(device)
    start = time.perf_counter()
    phase = next(iter(method.phases(ctx)))  # the task's first phase (linear_probe: embeds the images here)
    train_set = phase.data
    sync()
    setup_s = time.perf_counter() - start
    if phase.head_training is not None:  # a head alone on cached features
        head = phase.head_training
        optimizer = head.optimizer([p for p in head.head.parameters() if p.requires_grad])

        def training_step(batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return head.loss(head.head(batch[0]), batch[1])

    else:
        method.phase = phase
        opt = method.configure_optimizers()
        optimizer = opt["optimizer"] if isinstance(opt, dict) else opt
        training_step = method.training_step
    loader = ctx.loader(train_set, phase.batch_size, shuffle=True)
    weights = {p.untyped_storage().data_ptr() for p in [*method.parameters(), *method.buffers()]}
    meter = SavedTensorMeter(weights)
    method.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, data_times, losses, saved = [], [], [], []
    batches = iter(loader)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        sync()
        t1 = time.perf_counter()
        with meter.hooks:
            loss = training_step((x, y), i)
        saved.append(meter.step_bytes())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        t2 = time.perf_counter()
        losses.append(loss.detach().item())
        if i >= warmup:
            data_times.append(t1 - t0)
            step_times.append(t2 - t1)
    trainable = [p for p in method.parameters() if p.requires_grad]
    optimizer_state = [t for state in optimizer.state.values() for t in state.values()]
    mem = {
        "weights_mb": tensor_bytes([*method.parameters(), *method.buffers()]) / MB,
        "grads_mb": tensor_bytes(trainable) / MB,
        "optimizer_mb": tensor_bytes(optimizer_state) / MB,
        "activations_mb": max(saved) / MB,
        "train_set_mb": tensor_bytes(train_set.tensors) / MB if isinstance(train_set, TensorDataset) else 0.0,
    }
    steps_per_epoch = len(loader)
    epoch_s = steps_per_epoch * (statistics.mean(step_times) + statistics.mean(data_times))
    cil, _ = evaluator.evaluate(method, 0)
    return {
        "overrides": overrides,
        "batch_size": method.batch_size,
        "epochs": method.epochs,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in method.parameters()),
        **mem,
        "mem_mb": sum(mem.values()),
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None,
        "setup_s": setup_s,
        "step_s": statistics.median(step_times),
        "data_s": statistics.mean(data_times),
        "steps_per_epoch": steps_per_epoch,
        "epoch_s_est": epoch_s,
        "task_s_est": setup_s + method.epochs * epoch_s,
        "steps": steps,
        "loss_first": statistics.mean(losses[:5]),
        "loss_last": statistics.mean(losses[-5:]),
        "acc_task0": cil[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_input_tuning.json"))
    parser.add_argument("--steps", type=int, default=20, help="measured training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="cl-bench overrides (after --)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    overrides = args.overrides or DEFAULT_OVERRIDES
    results = {}
    for label in args.variants:
        results[label] = measure([*overrides, *VARIANTS[label]], args.steps, args.warmup)
        r = results[label]
        print(
            f"{label:28s} trainable {r['trainable_params']:>9,d}  mem {r['mem_mb']:8.1f} MB "
            f"(activations {r['activations_mb']:.1f})  step {r['step_s'] * 1e3:7.1f} ms  "
            f"task {r['task_s_est']:7.1f} s  acc {r['acc_task0']:.1f}",
            flush=True,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
