"""DualPrompt: Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy, Pfister, "DualPrompt:
Complementary Prompting for Rehearsal-free Continual Learning" (ECCV 2022). Faithful to the official PyTorch
port ``JH-LEE-KR/dualprompt-pytorch`` (``7eb457d``; ``configs/{cifar100,imr}_dualprompt.py``, ``prompt.py``,
``attention.py``, ``vision_transformer.py``, ``engine.py``); spec ``shared/research/methods_vit.md`` §5.

* A frozen ViT. A G(eneral)-prompt, shared by all tasks, on layers ``g_layers`` (0, 1), length
  ``g_length`` (5). E(xpert)-prompts, one per task with a learnable key, on layers ``e_layers`` (2, 3, 4),
  length ``e_length`` (5 for CIFAR-100, 20 for ImageNet-R). All start ``U(-1, 1)``.
* ``prefix`` insertion (official): each prompt is ``length`` key and ``length`` value vectors concatenated to
  that layer's attention keys/values (:func:`~cl_bench.modules.prompts.prefix_attention`); ``prompt``:
  ``length`` tokens added to the sequence before that layer (prompt tuning).
* Training task ``t``: every image uses E-prompt ``t`` (official ``use_prompt_mask``); loss = cross-entropy
  over task ``t``'s classes (``train_mask``) minus ``pull_coefficient`` (1.0) times ``cos(q, k_t)`` summed
  over the batch / B, where ``q`` is the frozen model's [CLS] feature. Trained: G-prompt, E-prompt ``t``, key
  ``t``, head. E-prompt ``t`` starts as a copy of E-prompt ``t-1`` (official ``shared_prompt_pool``; its key
  does not, ``shared_prompt_key`` False). Adam, constant lr ``0.03 * 24 / 256`` (CIFAR-100) or
  ``0.005 * 24 / 256`` (ImageNet-R), batch 24, 5 / 50 epochs, gradient norm clipped at 1, fresh optimiser
  per task. The head reads the [CLS] token.
* Test: the E-prompt whose key is most cosine-similar to ``q`` (top-1); :meth:`predict` returns it as the
  chosen task (the ``task_selection_acc`` extra matrix). With a task id (task-incremental evaluation),
  that task's E-prompt.

Deviations (with the switch that restores the official behaviour where one exists):

* Test-time matching runs over the keys of the tasks seen so far; the official pool (``size`` 10 = number
  of tasks in its configs) also offers the never-trained keys of future tasks. ``pool_size`` here is the
  number of tasks.
* ``batchwise_selection`` (off by default): the official CIFAR-100 config sets ``batchwise_prompt``, which
  only acts at test time (training uses the task's prompt) and there gives every image of a test batch the
  batch's majority E-prompt. cl_bench evaluates one task's images per batch, so this would hand the task id
  to the model; ``batchwise_selection=true`` restores it. The ImageNet-R config has it off.
* Logits cover the classes seen so far (growing head; official: all classes, untrained rows included);
  ``nn.Linear`` initialisation for the head blocks (official timm truncated normal 0.02).
* ``insertion=prompt`` also prepends the G-prompt at its layers, as the paper describes; the official port
  silently drops the G-prompt unless it is prefix-tuned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import Capabilities, TaskContext
from cl_bench.methods.prompt_method import PromptMethod
from cl_bench.modules.prompts import Prefix, PromptPool, prompted_tokens, select_top_k

INSERTIONS = ("prefix", "prompt")


class DualPrompt(PromptMethod):
    """G-prompts on early layers, key-matched per-task E-prompts on later layers of a frozen ViT.

    Args (beyond :class:`~cl_bench.methods.prompt_method.PromptMethod`'s; defaults: official Split
    CIFAR-100 config):
        g_layers, g_length: G-prompt layers (0, 1) and length (5); ``g_length=0`` disables it.
        e_layers, e_length: E-prompt layers (2, 3, 4) and length (5; ImageNet-R 20).
        insertion: ``prefix`` (prefix tuning, official) or ``prompt`` (prompt tuning).
        pull_coefficient: weight of the key-query pull term (1.0).
        copy_previous_prompt: E-prompt ``t`` starts from E-prompt ``t-1`` (official ``shared_prompt_pool``).
        batchwise_selection: the batch's majority E-prompt at test time (module docstring).
        epochs, batch_size, lr: 5 epochs of batches of 24 at ``0.03 * 24 / 256`` (official).
    """

    CAPABILITIES = Capabilities(task_conditioned=True, selects_task=True)

    def __init__(
        self,
        backbone: Backbone,
        g_layers: list[int] | tuple[int, ...] = (0, 1),
        g_length: int = 5,
        e_layers: list[int] | tuple[int, ...] = (2, 3, 4),
        e_length: int = 5,
        insertion: str = "prefix",
        pull_coefficient: float = 1.0,
        copy_previous_prompt: bool = True,
        batchwise_selection: bool = False,
        epochs: int = 5,
        batch_size: int = 24,
        lr: float = 0.0028125,
        **base_args: Any,
    ) -> None:
        if insertion not in INSERTIONS:
            raise ConfigError(f"method.insertion={insertion!r}: choose one of {list(INSERTIONS)}")
        if e_length < 1 or g_length < 0 or not e_layers:
            raise ConfigError(
                "method.e_layers must be non-empty, method.e_length >= 1 and method.g_length >= 0"
            )
        super().__init__(backbone, epochs=epochs, batch_size=batch_size, lr=lr, **base_args)
        depth = len(self.vit.blocks)
        self.g_layers = list(g_layers) if g_length else []
        self.e_layers = list(e_layers)
        layers = self.g_layers + self.e_layers
        if len(set(layers)) != len(layers) or not all(0 <= i < depth for i in layers):
            raise ConfigError(
                f"method.g_layers={self.g_layers} and method.e_layers={self.e_layers} must be distinct layer "
                f"indices in [0, {depth}) for this {depth}-block ViT"
            )
        self.dim = int(self.vit.embed_dim)
        self.insertion = insertion
        self.g_length = g_length
        self.e_length = e_length
        kv = (2,) if insertion == "prefix" else ()
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), *kv, g_length, self.dim).uniform_(-1, 1))
        #: Built at the first task, with one entry per task of the scenario.
        self.e_pool: PromptPool | None = None
        self.e_prompt_shape = (len(self.e_layers), *kv, e_length, self.dim)
        self.pull_coefficient = pull_coefficient
        self.copy_previous_prompt = copy_previous_prompt
        self.batchwise_selection = batchwise_selection

    def on_task_start(self, ctx: TaskContext) -> None:
        """Build the E-prompt pool (first task); make E-prompt and key ``t`` the only trainable entries."""
        super().on_task_start(ctx)
        index = ctx.task.index
        if self.e_pool is None:
            self.e_pool = PromptPool(len(ctx.scenario.tasks), self.dim, self.e_prompt_shape)
        if index >= self.e_pool.size:
            raise RuntimeError(
                f"task {index} beyond the {self.e_pool.size} E-prompts built for this scenario"
            )
        if index > 0 and self.copy_previous_prompt:
            with torch.no_grad():
                self.e_pool.prompts[index].copy_(self.e_pool.prompts[index - 1])
        self.e_pool.set_trainable([index])

    def structure(self) -> dict[str, Any]:
        """The base's, plus the size of the E-prompt pool (``None`` before the first task)."""
        return {**super().structure(), "e_pool_size": None if self.e_pool is None else self.e_pool.size}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Rebuild the E-prompt pool at its saved size (its values come with the ``state_dict``)."""
        super().restore_structure(structure)
        if structure["e_pool_size"] is not None:
            self.e_pool = PromptPool(int(structure["e_pool_size"]), self.dim, self.e_prompt_shape)

    def layer_prompts(self, e_prompts: torch.Tensor) -> tuple[dict[int, Prefix], dict[int, torch.Tensor]]:
        """Prefixes or appended tokens per layer from each image's E-prompt ``[B, *e_prompt_shape]``."""
        batch = e_prompts.shape[0]
        g_prompts = self.g_prompt.unsqueeze(0).expand(batch, *self.g_prompt.shape)
        per_layer = {layer: g_prompts[:, i] for i, layer in enumerate(self.g_layers)}
        per_layer |= {layer: e_prompts[:, i] for i, layer in enumerate(self.e_layers)}
        if self.insertion == "prompt":
            return {}, per_layer
        return {layer: (p[:, 0], p[:, 1]) for layer, p in per_layer.items()}, {}

    def prompted(
        self, x: torch.Tensor, query: torch.Tensor, task: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """E-prompt ``task`` (training, or a given task id) or the best-matching one; [CLS] features."""
        assert self.e_pool is not None and self.task is not None, "no task has started yet"
        similarity = self.e_pool.similarity(query, entries=self.task.index + 1)
        if task is None:
            chosen = select_top_k(similarity, 1, self.batchwise_selection)[:, 0]
        else:
            chosen = torch.full((len(x),), task, dtype=torch.long, device=x.device)
        prefixes, appended = self.layer_prompts(self.e_pool.gather(chosen.unsqueeze(1))[:, 0])
        tokens = prompted_tokens(self.vit, x, prefixes=prefixes, appended=appended)
        loss = None
        if self.training:
            loss = -self.pull_coefficient * similarity.gather(1, chosen.unsqueeze(1)).sum() / len(x)
        return tokens[:, 0], loss, chosen
