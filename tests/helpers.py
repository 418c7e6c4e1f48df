"""Helpers shared by the tests (`from helpers import ...`); the fixtures live in conftest.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.config import TrainerConfig
from cl_bench.methods.base import ContinualModule, Phase, TaskContext
from cl_bench.scenario import Scenario, ScenarioType, Task

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "cl_bench" / "conf"
SHARED = REPO_ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_DATA = SHARED / "data"

#: Overrides that make a run tiny and quiet: fake-free real digits, 2 tasks, no W&B, one epoch.
TINY = (
    "dataset=digits",
    "dataset.size=16",
    "transform.input_size=16",
    "scenario.n_tasks=2",
    "scenario.order_seed=0",
    "logger.mode=disabled",
    "trainer.accelerator=cpu",
    "save_model=false",
)

#: Overrides (after TINY) for a one-block ViT on 8 px digits: whole runs of the methods built for pre-trained
#: transformers.
TINY_VIT_RUN = (
    "dataset.size=8",
    "transform.input_size=8",
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size:8,patch_size:4,depth:1,embed_dim:32,num_heads:2}",
    "method.epochs=1",
    "method.batch_size=64",
)


def compose_config(*overrides: str):
    """Compose ``cl_bench/conf/config.yaml`` with command-line style overrides, as ``cl-bench`` would."""
    from hydra import compose, initialize_config_dir

    import cl_bench.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def toy_scenario(sizes: Sequence[int], til: bool = False) -> Scenario:
    """Tasks of ``sizes`` classes in class order ``0, 1, ...`` (the identity order)."""
    tasks, start = [], 0
    for index, size in enumerate(sizes):
        tasks.append(Task(index, start, start + size, tuple(range(start, start + size))))
        start += size
    return Scenario(ScenarioType.til if til else ScenarioType.cil, tuple(range(start)), tuple(tasks))


def task_context(
    scenario: Scenario, task: int, train: Dataset, train_eval: Dataset | None = None, seed: int = 0
) -> TaskContext:
    """The context of learning task ``task`` of ``scenario`` on ``train`` (``train_eval``: ``train``)."""
    return TaskContext(
        scenario.tasks[task], scenario, train, train if train_eval is None else train_eval, seed=seed
    )


@dataclass(frozen=True)
class ToyTasks:
    """Random tensor data for the tasks of ``toy_scenario(sizes)``: ``n_per_class`` inputs of ``input_shape``
    per class, labels cycling over the task's classes (``start, start + 1, ..., start, ...``: every
    ``num_classes`` consecutive rows hold each class once), inputs ``N(0, 1) + class_shift * label`` (a
    non-zero shift gives each class its own mean: class-structured data)."""

    sizes: tuple[int, ...]
    n_per_class: int
    input_shape: tuple[int, ...]
    class_shift: float = 0.0

    def context(self, task: int, til: bool = False) -> TaskContext:
        """The context of ``task`` (task-incremental if ``til``), its inputs drawn from seed ``task``: tasks
        differ, and the same task's context is rebuilt identically."""
        scenario = toy_scenario(self.sizes, til)
        spec = scenario.tasks[task]
        labels = spec.start + torch.arange(self.n_per_class * spec.num_classes) % spec.num_classes
        generator = torch.Generator().manual_seed(task)
        inputs = torch.randn(len(labels), *self.input_shape, generator=generator)
        inputs += self.class_shift * labels.view(-1, *[1] * len(self.input_shape))
        return task_context(scenario, task, TensorDataset(inputs, labels))


def learn(method: ContinualModule, ctx: TaskContext) -> float:
    """Learn one task as the runner does (its phases, each one Lightning fit on the CPU)."""
    from cl_bench.learning import learn_task

    return learn_task(
        method, ctx, TrainerConfig(accelerator="cpu"), torch.device("cpu"), Path("."), lambda _: None
    )


def fit_phase(method: ContinualModule, phase: Phase, ctx: TaskContext) -> None:
    """Fit one phase as the runner does (one Lightning fit on the CPU)."""
    from cl_bench.learning import run_phase

    run_phase(method, phase, ctx, TrainerConfig(accelerator="cpu"), Path("."), [])


def end_task(method: ContinualModule, ctx: TaskContext, skip: tuple[str, ...] = ("train",)) -> None:
    """Run the task's phases except those named in ``skip`` (a test stands in for them), then
    ``on_task_end``: e.g. SLCA's statistics and classifier alignment after a hand-made ``train``."""
    for phase in method.phases(ctx):
        if phase.name not in skip and phase.trains:
            fit_phase(method, phase, ctx)
    method.on_task_end(ctx)


class LinearBackbone(Backbone):
    """``f = A x + a`` with ``A`` 3x4: small enough to differentiate by hand (unit tests of the maths)."""

    feat_dim = 3
    data_config = DataConfig(input_size=1)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TinyBackbone(LinearBackbone):
    """``f = tanh(A x + a)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def write_domainnet(
    root: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    n_train: int = 4,
    n_test: int = 2,
    size: int = 16,
) -> None:
    """A tiny DomainNet in its release layout: ``<domain>/<class>/<image>.jpg`` and the split lists
    ``<domain>_{train,test}.txt`` of ``<domain>/<class>/<image> <label>`` lines. Class ``c`` is tinted by its
    colour channel (``c % 3``) and level, each domain by its brightness, with a little noise."""
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(0)
    for d, domain in enumerate(domains):
        for split, n in (("train", n_train), ("test", n_test)):
            lines = []
            for label, name in enumerate(classes):
                for k in range(n):
                    rel = f"{domain}/{name}/{domain}_{name}_{split}_{k}.jpg"
                    image = torch.full((3, size, size), 40.0 + 30.0 * d)
                    image[label % 3] += 60.0 + 40.0 * (label // 3)
                    image += 8.0 * torch.randn(3, size, size, generator=generator)
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    pixels = image.clamp(0, 255).to(torch.uint8)
                    (root / rel).write_bytes(encode_jpeg(pixels, quality=95).numpy().tobytes())
                    lines.append(f"{rel} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
