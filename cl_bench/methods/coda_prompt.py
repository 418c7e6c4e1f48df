"""CODA-Prompt: Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira, "CODA-Prompt:
COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning" (CVPR 2023). Faithful
to the official code ``GT-RIPL/CODA-Prompt`` (``6417d4f``; ``models/zoo.py::CodaPrompt``, ``models/vit.py``,
``learners/prompt.py``, ``configs/*_prompt.yaml``, ``experiments/*.sh``); spec ``methods_vit.md`` §5.

* A frozen ViT; on each of ``layers`` (0-4) a pool of ``pool_size`` (100) prompt components of
  ``prompt_length`` (8) rows, each with a key and an attention vector
  (:class:`~cl_bench.modules.prompts.CodaPrompt`). Task ``t`` owns ``pool_size / tasks`` of them, created at
  its start orthonormal to all earlier ones (Gram-Schmidt) and trained only during task ``t``.
* For query ``q`` (the frozen model's [CLS] feature) the layer's prompt is ``sum_m alpha_m P_m`` with
  ``alpha_m = cos(q * A_m, K_m)`` over the components of the tasks so far, end-to-end differentiable (no
  top-k); its two halves are prefix keys and values of that layer's attention.
* Loss: cross-entropy over the current task's classes (official: old-class logits set to ``-inf``) plus
  ``ortho_weight`` times the orthogonality penalty of ``K``, ``A`` and ``P`` (0 "with the updated code": the
  ``--prompt_param 100 8 0.0`` of every experiment script). Trained: the task's components, keys, attention
  vectors and the head. Adam (betas 0.9, 0.999), lr 1e-3, no weight decay, batch 128, 20 epochs (CIFAR-100),
  50 (ImageNet-R), 5 (DomainNet), the official cosine ``lr * cos(99 pi e / (200 (E - 1)))`` per epoch ``e``.
* Test: logits over the classes seen so far (official ``logits[:, :valid_out_dim]``: the same). CODA-Prompt
  does not choose a task: no task-selection accuracy.

Deviations: new components are made orthogonal to the *span* of the earlier ones (official: to each earlier
component in turn, which is exact only while those stay orthogonal; see
:func:`~cl_bench.modules.prompts.orthonormal_extension`); the head blocks use ``nn.Linear``'s
initialisation (official: one ``nn.Linear`` over all classes, PyTorch's default too); with a single epoch the
official schedule divides by zero, here the learning rate stays constant.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.prompt_method import PromptMethod
from cl_bench.modules.prompts import CodaPrompt, prompted_tokens

CODA_SCHEDULERS = ("coda_cosine", "cosine", "none")


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """The official ``CosineSchedule``: ``cos(99 pi e / (200 (E - 1)))`` (1 at ``e=0``, 0.016 at ``E-1``)."""
    return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


class CodaPromptMethod(PromptMethod):
    """Attention-weighted prompt components, prefix-tuned into the first layers of a frozen ViT.

    Args (beyond :class:`~cl_bench.methods.prompt_method.PromptMethod`'s; defaults: official Split
    CIFAR-100 run, ``--prompt_param 100 8 0.0``):
        pool_size: components per layer over the whole run (100), split evenly among the tasks.
        prompt_length: rows per component (8: 4 prefix keys + 4 prefix values).
        layers: the prompted layers (0-4).
        ortho_weight: weight of the orthogonality penalty (0.0).
        epochs, batch_size, lr: 20 epochs of batches of 128 at 1e-3 (official).
        scheduler: ``coda_cosine`` (official), ``cosine`` (annealed to 0) or ``none``.
        clip_grad_norm: ``None``: no clipping (the official code clips nothing).
    """

    def __init__(
        self,
        backbone: Backbone,
        pool_size: int = 100,
        prompt_length: int = 8,
        layers: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4),
        ortho_weight: float = 0.0,
        epochs: int = 20,
        batch_size: int = 128,
        lr: float = 0.001,
        scheduler: str = "coda_cosine",
        clip_grad_norm: float | None = None,
        **base_args: Any,
    ) -> None:
        if scheduler not in CODA_SCHEDULERS:
            raise ConfigError(f"method.scheduler={scheduler!r}: choose one of {list(CODA_SCHEDULERS)}")
        if ortho_weight < 0:
            raise ConfigError(f"method.ortho_weight={ortho_weight} must be >= 0")
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            scheduler="none" if scheduler == "coda_cosine" else scheduler,
            clip_grad_norm=clip_grad_norm,
            **base_args,
        )
        depth = len(self.vit.blocks)
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < depth for i in layers):
            raise ConfigError(f"method.layers={list(layers)} must be distinct layer indices in [0, {depth})")
        if prompt_length < 2 or prompt_length % 2:
            raise ConfigError(
                f"method.prompt_length={prompt_length} must be even (key and value halves) and >= 2"
            )
        self.pool_size = pool_size
        self.prompt_length = prompt_length
        self.layers = list(layers)
        self.ortho_weight = ortho_weight
        self.coda_schedule = scheduler == "coda_cosine"
        #: Built at the first task, when the number of tasks (components per task) is known.
        self.prompts: CodaPrompt | None = None

    def on_task_start(self, ctx: TaskContext) -> None:
        """Add task ``t``'s components (Gram-Schmidt); the earlier ones are frozen."""
        super().on_task_start(ctx)
        if self.prompts is None:
            per_task = self.pool_size // len(ctx.scenario.tasks)
            if per_task < 1:
                raise ConfigError(
                    f"method.pool_size={self.pool_size} gives no component to each of the "
                    f"{len(ctx.scenario.tasks)} tasks: use at least one per task"
                )
            self.prompts = CodaPrompt(self.layers, int(self.vit.embed_dim), self.prompt_length, per_task)
        if ctx.task.index != self.prompts.num_tasks:
            raise RuntimeError(
                f"tasks must be learned in order: task {ctx.task.index} after {self.prompts.num_tasks}"
            )
        self.prompts.add_task()

    def structure(self) -> dict[str, Any]:
        """The base's, plus the components per task and the number of tasks added (``None``: none yet)."""
        prompts = self.prompts
        return {
            **super().structure(),
            "components": None
            if prompts is None
            else {"per_task": prompts.components_per_task, "tasks": prompts.num_tasks},
        }

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Rebuild the components of the tasks added so far (values come with the ``state_dict``)."""
        super().restore_structure(structure)
        components = structure["components"]
        if components is not None:
            self.prompts = CodaPrompt(
                self.layers, int(self.vit.embed_dim), self.prompt_length, int(components["per_task"])
            )
            for _ in range(int(components["tasks"])):
                self.prompts.add_task()

    def prompted(
        self, x: torch.Tensor, query: torch.Tensor, task: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """Prefixes from all components so far; [CLS] features; (training) the orthogonality penalty."""
        assert self.prompts is not None, "no task has started yet"
        tokens = prompted_tokens(self.vit, x, prefixes=self.prompts.prefixes(query))
        loss = None
        if self.training and self.ortho_weight > 0:
            loss = self.ortho_weight * self.prompts.orthogonality_loss()
        return tokens[:, 0], loss, None

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The official per-epoch cosine (``coda_cosine``), else the base class's."""
        if not self.coda_schedule:
            return super().make_scheduler(optimizer)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(coda_cosine_factor, epochs=self.phase_epochs)
        )
