"""Benchmark: where a cl_bench run spends its time, against a bare PyTorch loop of the same work.

Writes one JSON document (``--out``, e.g. ``docs/bench/<machine>.json``) with these sections:

``startup``: the seconds each heavy import costs in a fresh interpreter (torch, torchvision,
pytorch_lightning, Hydra, cl_bench's runner, timm, wandb, scikit-learn's datasets), in that order.

``runs``: a fixed list of experiments, each in its own ``cl-bench`` process (instrumented, not changed):

* ``quickstart``: ``cl-bench`` with no arguments (digits, ResNet-20, seq_ft, W&B offline);
* ``simplecil_resnet32`` and ``seq_ft_resnet32``: Split CIFAR-100 from the CIFAR-10 ResNet-32
  (``protocol=cifar100_resnet32``, ``--data-dir``/``--weights-dir``);
* ``slca_vit_tiny``: SLCA on the small ViT (``protocol=cifar100_b50_vit_tiny``).

Per run: ``startup_s`` (process launch to the first task's start) and ``first_step_s`` (to the first
training batch), ``train_images_per_s`` (images over the seconds inside the Lightning fits of image phases),
``eval_images_per_s``, ``task_time_s`` (from results.json), ``task_end_s`` (``on_task_end``: prototypes,
statistics, alignment), ``wall_s``, ``peak_host_mb`` (the process's peak RSS), ``peak_device_mb`` (CUDA) and
``last_acc``, so speed never silently costs accuracy. ``--classes``/``--tasks``/``--epochs`` reduce every
protocol (the first classes of its class order, fewer tasks, fewer epochs) so the list runs in minutes on a
CPU; the reduction is recorded.

``ratios``: the same work done by cl_bench and by a bare PyTorch loop in this process, alternated
``--pairs`` times (median ratio; alternation spreads a shared machine's load over both):

* ``seq_ft_epoch``: one epoch of task 0 (``Trainer.fit`` of the seq_ft module vs a plain loop over the same
  loader, model and optimiser);
* ``simplecil_run``: a whole SimpleCIL run (``run_experiment``, W&B off) vs embedding every train and test
  image once and classifying by cosine to class means; the two accuracy matrices must agree;
* ``head_fit``: a linear_probe head (64-d, the method's defaults) on cached features: ``Trainer.fit`` vs
  the head-only fast path (:func:`cl_bench.modules.feature_fit.fit_on_features`) vs a bare loop;
* ``augmentation``: microseconds per image of the per-image torchvision train transform vs the batch-level
  one (:mod:`cl_bench.data.batch_transforms`), CIFAR recipe at 32 px and RandomResizedCrop 32 -> 224 px.

``gpu`` (only when CUDA is visible): ViT-B/16 (random init) training images/s in fp32 and bf16 with model
FLOPs utilisation against the device's peak; CIFAR ResNet-32 and ResNet-50 training in fp32, bf16,
channels_last and ``torch.compile``; the input pipeline feeding a ViT: per-image RandomResizedCrop in
DataLoader workers vs the batch augmentation on the GPU. Each measurement is saved as it completes
(a failing one records its error), the slow-to-start ``torch.compile`` variants last, so a GPU lent for a few
minutes leaves every figure it reached (``--sections gpu``).

Run (the machine and the thread count are recorded; say whether the machine was shared)::

    OMP_NUM_THREADS=1 python scripts/bench.py --out docs/bench/cpu_<host>.json --shared \
        --data-dir ../shared/data --weights-dir ../shared/weights --classes 20 --tasks 2 --epochs 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "cl_bench" / "conf"
RESNET32_WEIGHTS = "cifar10_akamaster_resnet32-d509ac18.th"
VIT_TINY_WEIGHTS = "vit_tiny6_c100first50.pth"
#: Dense peak FLOP/s by GPU model in the CUDA device name, more specific first: (fp32 without tensor cores,
#: bf16 tensor cores). Vendor sheets (NVL: their sparse bf16 figure halved).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200 NVL": (60e12, 835e12),
    "H200": (67e12, 989e12),
    "H100 NVL": (60e12, 835e12),
    "H100 SXM": (67e12, 989e12),
    "H100 PCIe": (51e12, 756e12),
    "H100": (67e12, 989e12),
    "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362e12),
    "A10": (31.2e12, 125e12),
}
CHILD_FLAG = "--child"


# ----------------------------------------------------------------------------------------------- runs
def experiments(args: argparse.Namespace) -> dict[str, list[str]]:
    """The fixed list: label -> cl-bench overrides (the reduction of ``--classes/--tasks/--epochs`` added)."""
    data = f"paths.data_dir={args.data_dir}"
    resnet = [
        "protocol=cifar100_resnet32",
        data,
        f"backbone.checkpoint={Path(args.weights_dir) / RESNET32_WEIGHTS}",
    ]
    vit = [
        "protocol=cifar100_b50_vit_tiny",
        data,
        f"backbone.checkpoint={Path(args.weights_dir) / VIT_TINY_WEIGHTS}",
    ]
    runs = {
        "quickstart": [],
        "simplecil_resnet32": [*resnet, "method=simplecil", *reduce(args, "resnet32")],
        "seq_ft_resnet32": [*resnet, "method=seq_ft", *reduce(args, "resnet32", epochs=True)],
        "slca_vit_tiny": [*vit, "method=slca", *reduce(args, "vit_tiny", epochs=True), "method.ca_epochs=1"],
    }
    return {k: v for k, v in runs.items() if not args.only or k in args.only}


def class_order(protocol: str) -> list[int]:
    """The class order of a protocol (cl_bench's: ``RandomState(seed).permutation``)."""
    if protocol == "resnet32":
        return np.random.RandomState(1993).permutation(100).tolist()
    from omegaconf import OmegaConf

    preset = OmegaConf.load(CONF_DIR / "protocol" / "cifar100_b50_vit_tiny.yaml")
    return list(preset.scenario.class_order)


def reduce(args: argparse.Namespace, protocol: str, epochs: bool = False) -> list[str]:
    out = []
    if args.classes:
        order = class_order(protocol)[: args.classes]
        out += ["scenario.order_seed=null", f"scenario.class_order=[{','.join(map(str, order))}]"]
    if args.tasks:
        out.append(f"scenario.n_tasks={args.tasks}")
    if epochs and args.epochs:
        out.append(f"method.epochs={args.epochs}")
    if epochs and args.epochs and protocol == "vit_tiny":
        out.append(f"method.milestones=[{args.epochs}]")
    return out


def child_main(result_file: str, overrides: list[str]) -> None:
    """Run ``cl-bench overrides`` in this process with timers around its stages (never changing them)."""
    launched = float(os.environ["CL_BENCH_BENCH_LAUNCHED"])
    stats: dict[str, Any] = {
        "fit_s": 0.0,
        "fit_images": 0,
        "eval_s": 0.0,
        "eval_images": 0,
        "task_end_s": 0.0,
    }

    import pytorch_lightning as pl

    import cl_bench.experiment as experiment
    import cl_bench.runner as runner
    from cl_bench.evaluation import Evaluator
    from cl_bench.methods.base import ContinualModule

    def mark(name: str) -> None:
        stats.setdefault(name, time.time() - launched)

    learn_task = runner.learn_task

    def timed_learn_task(*a: Any, **k: Any) -> Any:
        mark("startup_s")
        return learn_task(*a, **k)

    runner.learn_task = timed_learn_task

    def first_batch(self: Any, batch: Any, batch_idx: int) -> None:
        mark("first_step_s")

    ContinualModule.on_train_batch_start = first_batch  # a no-op hook in Lightning

    fit = pl.Trainer.fit

    def timed_fit(self: pl.Trainer, model: Any, train_dataloaders: Any = None, **k: Any) -> Any:
        start = time.perf_counter()
        out = fit(self, model, train_dataloaders=train_dataloaders, **k)
        stats["fit_s"] += time.perf_counter() - start
        stats["fit_images"] += len(train_dataloaders.dataset) * self.current_epoch
        return out

    pl.Trainer.fit = timed_fit  # type: ignore[method-assign]

    evaluate_rows = Evaluator.evaluate_rows

    def timed_eval(self: Any, module: Any, upto: int) -> Any:
        start = time.perf_counter()
        out = evaluate_rows(self, module, upto)
        stats["eval_s"] += time.perf_counter() - start
        stats["eval_images"] += sum(self.task_sizes[: upto + 1])
        return out

    Evaluator.evaluate_rows = timed_eval  # type: ignore[method-assign]

    build = experiment.build_from_config

    def timed_build(group: str, section: Any, **injected: Any) -> Any:
        obj = build(group, section, **injected)
        if group == "method":
            on_task_end = obj.on_task_end

            def timed_task_end(ctx: Any) -> None:
                start = time.perf_counter()
                on_task_end(ctx)
                stats["task_end_s"] += time.perf_counter() - start

            obj.on_task_end = timed_task_end
        return obj

    experiment.build_from_config = timed_build

    from cl_bench.cli import main

    sys.argv = ["cl-bench", *overrides]
    try:
        main()
    finally:
        import torch

        stats["peak_host_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            stats["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(result_file).write_text(json.dumps(stats))


def measure_run(label: str, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """One experiment in a fresh process; its timers, results.json and wall time."""
    out_dir = workdir / label
    result_file = workdir / f"{label}.timers.json"
    common = [f"paths.output_dir={out_dir}", "save_checkpoints=false", "save_model=false"]
    if label != "quickstart":
        common.append("logger.mode=disabled")
    env = {**os.environ, "CL_BENCH_BENCH_LAUNCHED": repr(time.time()), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG, str(result_file), "--", *overrides, *common],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"overrides": overrides, "error": proc.stderr[-3000:]}
    timers = json.loads(result_file.read_text())
    (results,) = out_dir.glob("runs/*/*/*/results.json")
    doc = json.loads(results.read_text())
    per_s = lambda n, s: n / s if s > 0 else None  # noqa: E731
    return {
        "overrides": overrides,
        "wall_s": wall,
        "startup_s": timers.get("startup_s"),
        "first_step_s": timers.get("first_step_s"),
        "train_images": timers["fit_images"],
        "train_fit_s": timers["fit_s"],
        "train_images_per_s": per_s(timers["fit_images"], timers["fit_s"]),
        "eval_images": timers["eval_images"],
        "eval_s": timers["eval_s"],
        "eval_images_per_s": per_s(timers["eval_images"], timers["eval_s"]),
        "task_time_s": doc["task_time_s"],
        "task_end_s": timers["task_end_s"],
        "peak_host_mb": timers["peak_host_mb"],
        "peak_device_mb": timers.get("peak_device_mb"),
        "last_acc": doc["last_acc"],
        "avg_inc_acc": doc["avg_inc_acc"],
    }


#: Imports timed one after another in a fresh process (each figure excludes what earlier ones imported).
STARTUP_IMPORTS = (
    "torch",
    "torchvision",
    "pytorch_lightning",
    "hydra, omegaconf",
    "cl_bench.runner",
    "timm",
    "wandb",
    "sklearn.datasets",
)


def startup_breakdown() -> dict[str, Any]:
    """Seconds of each import of :data:`STARTUP_IMPORTS` in a fresh interpreter, in that order, and of the
    interpreter itself (``python -c pass``)."""
    code = (
        "import json, time\nout = {}\n"
        + "".join(
            f"t = time.perf_counter()\nimport {name}\nout[{name!r}] = time.perf_counter() - t\n"
            for name in STARTUP_IMPORTS
        )
        + "print(json.dumps(out))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
    interpreter = time.perf_counter() - start
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return {
        "python_interpreter_s": interpreter,
        "imports_s": json.loads(proc.stdout.strip().splitlines()[-1]),
    }


# ----------------------------------------------------------------------------------------------- ratios
def alternate(pairs: int, ours: Callable[[], Any], bare: Callable[[], Any]) -> dict[str, Any]:
    """Time ``ours`` and ``bare`` alternately (which goes first alternates too); medians and the ratio."""
    ours_s, bare_s = [], []
    for k in range(pairs):
        order = [(ours, ours_s), (bare, bare_s)] if k % 2 == 0 else [(bare, bare_s), (ours, ours_s)]
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(ours_s, bare_s, strict=True)]
    return {
        "cl_bench_s": ours_s,
        "bare_s": bare_s,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import cl_bench.config  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def seq_ft_epoch(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One epoch of seq_ft on task 0: Lightning fit vs a bare loop (same model, loader, optimiser)."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from cl_bench.config import build_from_config
    from cl_bench.data.batch_transforms import build_input_pipeline
    from cl_bench.experiment import task_datasets
    from cl_bench.learning import run_phase
    from cl_bench.methods.base import TaskContext
    from cl_bench.scenario import build_scenario

    overrides = [o for o in experiments(args)["seq_ft_resnet32"] if not o.startswith("method.epochs=")]
    cfg = compose([*overrides, "method.epochs=1", "logger.mode=disabled"])
    trainer_cfg = OmegaConf.to_object(cfg.trainer)
    data = build_from_config("dataset", cfg.dataset)
    backbone = build_from_config("backbone", cfg.backbone)
    scenario = build_scenario(cfg.scenario, data.num_classes)
    pipeline = build_input_pipeline(backbone.data_config, cfg.transform, data, torch.device("cpu"))
    train_sets, _, _ = task_datasets(data, scenario, pipeline.train, pipeline.eval)

    def context() -> TaskContext:
        return TaskContext(scenario.tasks[0], scenario, train_sets[0], train_sets[0], seed=0)

    template = build_from_config("method", cfg.method, backbone=backbone)
    template.on_task_start(context())

    def ours() -> None:
        method, ctx = copy.deepcopy(template), context()
        (phase,) = method.phases(ctx)
        run_phase(method, phase, ctx, trainer_cfg, workdir / "seq_ft_epoch", [])

    def bare() -> None:
        method = copy.deepcopy(template)
        model = torch.nn.Sequential(method.backbone, method.head.blocks[0]).train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=method.lr, momentum=method.momentum, weight_decay=method.weight_decay
        )
        for x, y in context().loader(train_sets[0], method.batch_size, shuffle=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    result = alternate(args.pairs, ours, bare)
    result["images"] = len(train_sets[0])
    return result


def simplecil_run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A whole SimpleCIL run in this process vs the bare computation; both accuracy matrices."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from cl_bench.config import build_from_config
    from cl_bench.data.batch_transforms import build_input_pipeline
    from cl_bench.experiment import task_datasets
    from cl_bench.runner import run_experiment
    from cl_bench.scenario import build_scenario

    overrides = [*experiments(args)["simplecil_resnet32"], "logger.mode=disabled", "save_model=false"]
    overrides.append("save_checkpoints=false")
    counter = iter(range(10**6))
    matrices: dict[str, list[list[float]]] = {}

    def ours() -> None:
        cfg = compose([*overrides, f"paths.run_dir={workdir / f'simplecil_{next(counter)}'}"])
        matrices["cl_bench"] = run_experiment(cfg)["acc_matrix"]

    def bare() -> None:
        cfg = compose(overrides)
        data = build_from_config("dataset", cfg.dataset)
        backbone = build_from_config("backbone", cfg.backbone).eval()
        scenario = build_scenario(cfg.scenario, data.num_classes)
        pipeline = build_input_pipeline(backbone.data_config, cfg.transform, data, torch.device("cpu"))
        _, train_eval, test = task_datasets(data, scenario, pipeline.train, pipeline.eval)

        @torch.no_grad()
        def embed(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
            batches = [
                (backbone(x), y) for x, y in DataLoader(dataset, batch_size=cfg.trainer.eval_batch_size)
            ]
            return torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])

        prototypes, tests, rows = [], [], []
        for task in scenario.tasks:
            features, labels = embed(train_eval[task.index])
            prototypes += [features[labels == c].mean(0) for c in range(task.start, task.stop)]
            tests.append(embed(test[task.index]))
            protos = F.normalize(torch.stack(prototypes), dim=1)
            rows.append(
                [
                    100.0 * float(((F.normalize(f, dim=1) @ protos.T).argmax(1) == y).float().mean())
                    for f, y in tests
                ]
            )
        matrices["bare"] = rows

    result = alternate(args.pairs, ours, bare)
    ours_rows = [[v for v in row if v is not None] for row in matrices["cl_bench"]]
    result["max_abs_acc_difference"] = max(
        abs(a - b)
        for ra, rb in zip(ours_rows, matrices["bare"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    return result


def head_fit(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """linear_probe's head-only phase on 64-d cached features as the runner fits it, by Lightning
    (``trainer.head_fast_path=false``) and by the fast path, each against a bare loop."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    from cl_bench.backbones.base import Backbone, DataConfig
    from cl_bench.config import ScenarioType, TrainerConfig
    from cl_bench.learning import run_phase
    from cl_bench.methods.base import TaskContext
    from cl_bench.methods.linear_probe import LinearProbe
    from cl_bench.scenario import Scenario, Task

    class Features(Backbone):
        feat_dim = 64
        data_config = DataConfig(input_size=1)

        def __init__(self) -> None:
            super().__init__()
            self.identity = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.identity(x)

    n, classes = 5000, 10
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    data = TensorDataset(torch.randn(n, 64, generator=g) + labels[:, None] * 0.1, labels)
    task = Task(0, 0, classes, tuple(range(classes)))
    scenario = Scenario(ScenarioType.cil, tuple(range(classes)), (task,))

    def context() -> TaskContext:
        return TaskContext(task, scenario, data, data)

    template = LinearProbe(Features())  # the method's defaults: 30 epochs, batch 128, SGD, cosine
    template.on_task_start(context())
    heads: dict[str, torch.Tensor] = {}

    def fit(fast_path: bool) -> None:
        """linear_probe's head-only phase as the runner fits it, by Lightning or by the fast path."""
        method, ctx = copy.deepcopy(template), context()
        (phase,) = method.phases(ctx)
        trainer_cfg = TrainerConfig(accelerator="cpu", head_fast_path=fast_path)
        run_phase(method, phase, ctx, trainer_cfg, workdir / "head_fit", [])
        heads["fast" if fast_path else "lightning"] = method.head.blocks[0].weight.detach().clone()

    def lightning() -> None:
        fit(False)

    def fast() -> None:
        fit(True)

    def bare() -> None:
        head = copy.deepcopy(template.head.blocks[0])
        optimizer = torch.optim.SGD(head.parameters(), lr=template.lr, momentum=template.momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=template.epochs)
        loader = context().loader(data, template.batch_size, shuffle=True)
        for _ in range(template.epochs):
            for x, y in loader:
                loss = F.cross_entropy(head(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()

    versus_bare = alternate(args.pairs, lightning, bare)
    fast_vs_bare = alternate(args.pairs, fast, bare)
    return {
        "features": n,
        "epochs": template.epochs,
        "lightning_fit": versus_bare,
        "fit_on_features": fast_vs_bare,
        "speedup_fast_path": statistics.median(versus_bare["cl_bench_s"])
        / statistics.median(fast_vs_bare["cl_bench_s"]),
        "max_abs_weight_difference": float((heads["lightning"] - heads["fast"]).abs().max()),
    }


def augmentation(args: argparse.Namespace, device: str = "cpu", n: int = 512) -> dict[str, Any]:
    """Microseconds per image: per-image train transform vs the batch augmentation (on ``device``)."""
    import torch

    from cl_bench.backbones.base import DataConfig
    from cl_bench.config import TransformConfig
    from cl_bench.data.batch_transforms import BatchAugment
    from cl_bench.data.transforms import batch_prepare_transform, resolve_spec, train_pipeline

    cases = {
        "crop_flip_32px": (DataConfig(32), TransformConfig(train="crop_flip")),  # type: ignore[arg-type]
        "rrc_32_to_224px_bicubic": (
            DataConfig(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9),
            TransformConfig(train="rrc_flip", brightness=63 / 255),  # type: ignore[arg-type]
        ),
    }
    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out: dict[str, Any] = {}
    for name, (dc, cfg) in cases.items():
        spec = resolve_spec(dc, cfg, dataset_hflip_invariant=True)
        per_image, prepare, batch = train_pipeline(spec), batch_prepare_transform(spec), BatchAugment(spec)

        def run_per_image(per_image: Any = per_image) -> None:
            torch.stack([per_image(x) for x in images])

        def run_batch(prepare: Any = prepare, batch: Any = batch) -> None:
            x = torch.stack([prepare(x) for x in images]).to(device)
            batch(x)
            if device != "cpu":
                torch.cuda.synchronize()

        timing = alternate(args.pairs, run_batch, run_per_image)
        out[name] = {
            "images": n,
            "per_image_us": 1e6 * statistics.median(timing["bare_s"]) / n,
            "batch_us": 1e6 * statistics.median(timing["cl_bench_s"]) / n,
            "speedup": 1 / timing["ratio_median"],
        }
    return out


# ----------------------------------------------------------------------------------------------- GPU
def gpu_peak(name: str) -> tuple[float, float] | None:
    """The peaks of the first :data:`GPU_PEAKS` model named in ``name`` as a whole word ("A10" is not an
    "A10G"); ``None``: unknown, no MFU."""
    words = lambda key: rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])"  # noqa: E731
    return next((peak for key, peak in GPU_PEAKS.items() if re.search(words(key), name)), None)


def train_throughput(
    model: Any, batch: int, size: int, device: Any, dtype: Any = None, steps: int = 20, warmup: int = 5,
    channels_last: bool = False, compile_model: bool = False, classes: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    """Images/s of SGD training steps on synthetic data already on ``device``, and FLOPs per image."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_model = torch.compile(model) if compile_model else model
    cast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype is not None
        else torch.autocast(device.type, enabled=False)
    )

    def step() -> None:
        with cast:
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    counter = FlopCounterMode(display=False)
    with counter:
        with cast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / batch
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    images_per_s = batch * steps / seconds
    return {"batch": batch, "images_per_s": images_per_s, "flops_per_image": flops_per_image,
            "achieved_tflops": images_per_s * flops_per_image / 1e12}  # fmt: skip


def guarded(
    out: dict[str, Any], key: str, fn: Callable[[], Any], save: Callable[[], None] = lambda: None
) -> None:
    """``out[key] = fn()``, or the error it raised (one failing measurement must not lose the others), then
    ``save()`` so that a process killed later keeps it."""
    try:
        out[key] = fn()
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    save()


def augmentation_feed(device: Any, workers: list[int], n: int = 4096, batch: int = 256) -> dict[str, Any]:
    """Images/s the input pipeline delivers to ``device`` for a ViT at 224 px from 32 px CIFAR images:
    per-image RandomResizedCrop (+ flip, jitter, normalise) in DataLoader workers vs uint8 batches augmented
    on the device."""
    import torch
    from torch.utils.data import DataLoader

    from cl_bench.backbones.base import DataConfig
    from cl_bench.config import TransformConfig
    from cl_bench.data.base import ArrayImages, TaskDataset
    from cl_bench.data.batch_transforms import BatchAugment
    from cl_bench.data.transforms import batch_prepare_transform, resolve_spec, train_pipeline

    spec = resolve_spec(
        DataConfig(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9),
        TransformConfig(train="rrc_flip", brightness=63 / 255),  # type: ignore[arg-type]
        dataset_hflip_invariant=True,
    )
    images = ArrayImages(
        np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.zeros(n, int)
    )
    label_map = np.zeros(1, dtype=np.int64)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {}

    def drain(loader: DataLoader, augment: Any = None) -> float:
        start = time.perf_counter()
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if augment is not None:
                augment(x)
        sync()
        return n / (time.perf_counter() - start)

    def feed(transform: Any, workers: int, augment: Any = None) -> float:
        dataset = TaskDataset(images, np.arange(n), label_map, transform)
        pin = device.type == "cuda"
        return drain(DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=pin), augment)

    # each its own entry: per-image float batches (150 MB each at 224 px) can exhaust a small /dev/shm
    key = "batch_on_device_images_per_s"
    guarded(out, key, lambda: feed(batch_prepare_transform(spec), min(2, max(workers)), BatchAugment(spec)))
    for w in workers:
        guarded(out, f"per_image_{w}_workers_images_per_s", lambda w=w: feed(train_pipeline(spec), w))
    return out


def gpu_device() -> Any:
    """The GPU the section measures; ``None`` without CUDA."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else None


def gpu_section(args: argparse.Namespace, device: Any, out: dict[str, Any], save: Callable[[], None]) -> None:
    """ViT-B/16 fp32 vs bf16 with MFU, CNN variants, augmentation feed, then the ``torch.compile`` variants
    (slowest to start), into ``out``, saved after each (the GPU may be lent for one short shot)."""
    import timm
    import torch

    from cl_bench.backbones.cifar_resnet import CifarResNet

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    peak = gpu_peak(name)
    # fp32 MFU is against the peak without tensor cores: true while fp32 matmuls do not use TF32
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn_conv": torch.backends.cudnn.allow_tf32}
    out.update({"device": name, "peak_flops_fp32_bf16": peak, "fp32_uses_tf32": tf32})
    save()

    def measure(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        guarded(out, key, fn, save)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for label, dtype, index in (("vit_b16_fp32", None, 0), ("vit_b16_bf16", torch.bfloat16, 1)):

        def vit(dtype: Any = dtype, index: int = index) -> dict[str, Any]:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
            result = train_throughput(model, args.gpu_batch, 224, device, dtype, classes=100)
            if peak is not None:
                result["mfu"] = result["achieved_tflops"] * 1e12 / peak[index]
            return result

        measure(label, vit)

    class ResNet32(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = CifarResNet(32)
            self.fc = torch.nn.Linear(64, 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.backbone(x))

    cnns: dict[str, tuple[Callable[[], Any], int, int]] = {
        "resnet32_cifar": (ResNet32, 32, 512),
        "resnet50": (lambda: timm.create_model("resnet50", pretrained=False, num_classes=100), 224, 128),
    }
    eager = (
        ("fp32", {}),
        ("bf16", {"dtype": torch.bfloat16}),
        ("bf16_channels_last", {"dtype": torch.bfloat16, "channels_last": True}),
    )
    compiled = (
        (
            "bf16_channels_last_compile",
            {"dtype": torch.bfloat16, "channels_last": True, "compile_model": True},
        ),
    )

    def cnn_variants(variants: tuple[tuple[str, dict[str, Any]], ...]) -> None:
        for cnn, (make, size, batch) in cnns.items():
            for variant, kwargs in variants:

                def run(make: Any = make, size: int = size, batch: int = batch, kw: Any = kwargs) -> Any:
                    return train_throughput(make(), batch, size, device, classes=100, **kw)

                measure(f"{cnn}_{variant}", run)

    cnn_variants(eager)
    cores = len(os.sched_getaffinity(0))
    measure(
        "augmentation_feed_vit224", lambda: augmentation_feed(device, sorted({max(1, cores // 2), cores}))
    )
    cnn_variants(compiled)


# ----------------------------------------------------------------------------------------------- main
def machine(shared: bool) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )  # fmt: skip
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "shared_machine": shared,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (e.g. docs/bench/cpu_HOST.json)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--weights-dir", default=str(REPO.parent / "shared" / "weights"))
    p.add_argument("--classes", type=int, default=None, help="use only the first N classes of each order")
    p.add_argument("--tasks", type=int, default=None, help="scenario.n_tasks for the reduced protocols")
    p.add_argument("--epochs", type=int, default=None, help="method.epochs for the trained methods")
    p.add_argument("--pairs", type=int, default=3, help="alternated cl_bench/bare repetitions per ratio")
    p.add_argument("--only", nargs="*", default=None, help="run only these experiments of the fixed list")
    sections = ["startup", "runs", "ratios", "gpu"]
    p.add_argument("--sections", nargs="*", default=sections, choices=sections)
    p.add_argument("--gpu-batch", type=int, default=128, help="ViT-B/16 batch in the GPU section")
    p.add_argument("--shared", action="store_true", help="record that other jobs shared the machine")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    doc: dict[str, Any] = {"command": " ".join(["scripts/bench.py", *argv]), "machine": machine(args.shared)}
    doc["reduction"] = {"classes": args.classes, "tasks": args.tasks, "epochs": args.epochs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # atomic: a process killed while saving keeps the previous document
        from cl_bench.storage import write_text

        write_text(out, json.dumps(doc, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="cl_bench_bench_") as tmp:
        workdir = Path(tmp)
        if "startup" in args.sections:
            doc["startup"] = startup_breakdown()
            save()
        if "runs" in args.sections:
            doc["runs"] = {}
            for label, overrides in experiments(args).items():
                print(f"run {label} ...", flush=True)
                doc["runs"][label] = measure_run(label, overrides, workdir)
                save()
        if "ratios" in args.sections:
            doc["ratios"] = {}
            for label, fn in (
                ("augmentation", lambda: augmentation(args)),
                ("head_fit", lambda: head_fit(args, workdir)),
                ("seq_ft_epoch", lambda: seq_ft_epoch(args, workdir)),
                ("simplecil_run", lambda: simplecil_run(args, workdir)),
            ):
                print(f"ratio {label} ...", flush=True)
                guarded(doc["ratios"], label, fn, save)  # e.g. no data here: the GPU section still runs
        if "gpu" in args.sections:
            device = gpu_device()
            if device is not None:
                doc["gpu"] = {}
                gpu_section(args, device, doc["gpu"], save)
            else:
                doc["gpu"] = "no CUDA device visible: not measured"
            save()
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        child_main(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
    else:
        main(sys.argv[1:])
