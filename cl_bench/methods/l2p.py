"""L2P: Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister, "Learning to Prompt for Continual
Learning" (CVPR 2022). Faithful to the official PyTorch port ``JH-LEE-KR/l2p-pytorch`` (``f7bc994``;
``configs/cifar100_l2p.py``, ``prompt.py``, ``vision_transformer.py``, ``engine.py``), which reproduces the
JAX paper's Split CIFAR-100 number (83.77 vs 83.83); spec ``shared/research/methods_vit.md`` §5.

* A frozen ViT and a pool of ``pool_size`` (10) prompts of ``prompt_length`` (5) tokens, each with a
  learnable key; all start ``U(-1, 1)``.
* Query ``q`` = the frozen model's [CLS] feature of the (augmented) image. The ``top_k`` (5) keys most
  cosine-similar to ``q`` choose the prompts; with ``batchwise_selection`` the batch's ``top_k`` most
  frequently chosen prompts are used for every image (official ``batchwise_prompt``, on for CIFAR-100).
* The chosen prompts (``top_k * prompt_length`` tokens) are inserted after [CLS] at the input, with [CLS]'s
  position embedding (:func:`~cl_bench.modules.prompts.prompted_tokens`); the head reads the mean of their
  output tokens (official ``head_type='prompt'``; ``token``: the [CLS] token).
* Loss: cross-entropy over the current task's classes (official ``train_mask``) minus ``pull_coefficient``
  (0.1) times the summed cosine of the chosen keys (``reduce_sim``). Trained: prompts, keys, head. Adam,
  constant lr ``0.03 * 16 / 256 = 0.001875``, batch 16, 5 epochs, gradient norm clipped at 1, a fresh
  optimiser per task (``reinit_optimizer``).

Deviations (with the switch that restores the official behaviour where one exists):

* ``batchwise_selection``: ``train`` (default) uses the batch-majority prompts in training only and selects
  per image at test time. The official code also votes over each test batch; cl_bench (like the official
  evaluation) feeds one task's test images per batch, so the vote would tell the model which images belong
  together. ``always`` restores it, ``never`` selects per image throughout.
* Logits at test time cover the classes seen so far (cl_bench's growing head); the official head has all
  classes from the start and the never-trained rows (initial weights) also compete. The head blocks use
  PyTorch's ``nn.Linear`` initialisation (official: timm's truncated normal, std 0.02, zero bias).
* Label smoothing 0.1 is in the official config but its criterion is a plain ``CrossEntropyLoss``: none here.
* Not implemented: the per-task prompt mask and shared pool of the 5-datasets config (``use_prompt_mask``).

L2P selects prompts, not tasks: it reports no task-selection accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.prompt_method import PromptMethod
from cl_bench.modules.prompts import PromptPool, prompted_tokens, pull_constraint, select_top_k

BATCHWISE_MODES = ("train", "always", "never")
HEAD_INPUTS = ("prompt", "token")


class L2P(PromptMethod):
    """Learning to Prompt: a key-matched prompt pool at the input of a frozen ViT.

    Args (beyond :class:`~cl_bench.methods.prompt_method.PromptMethod`'s; defaults: official Split
    CIFAR-100 config):
        pool_size, prompt_length, top_k: the pool (10 prompts of 5 tokens, 5 chosen per image).
        batchwise_selection: ``train``, ``always`` (official) or ``never`` (module docstring).
        pull_coefficient: weight of the key-query pull term (0.1).
        head_input: ``prompt`` (mean of the prompt tokens' outputs, official) or ``token`` ([CLS]).
        epochs, batch_size, lr: 5 epochs of batches of 16 at ``0.03 * 16 / 256`` (official).
    """

    def __init__(
        self,
        backbone: Backbone,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        batchwise_selection: str = "train",
        pull_coefficient: float = 0.1,
        head_input: str = "prompt",
        epochs: int = 5,
        batch_size: int = 16,
        lr: float = 0.001875,
        **base_args: Any,
    ) -> None:
        if batchwise_selection not in BATCHWISE_MODES:
            raise ConfigError(
                f"method.batchwise_selection={batchwise_selection!r}: choose one of {list(BATCHWISE_MODES)}"
            )
        if head_input not in HEAD_INPUTS:
            raise ConfigError(f"method.head_input={head_input!r}: choose one of {list(HEAD_INPUTS)}")
        if prompt_length < 1 or not 1 <= top_k <= pool_size:
            raise ConfigError(
                f"method.prompt_length={prompt_length} must be >= 1 and method.top_k={top_k} in "
                f"[1, pool_size={pool_size}]"
            )
        super().__init__(backbone, epochs=epochs, batch_size=batch_size, lr=lr, **base_args)
        dim = int(self.vit.embed_dim)
        self.pool = PromptPool(pool_size, dim, (prompt_length, dim))
        self.top_k = top_k
        self.prompt_length = prompt_length
        self.batchwise_selection = batchwise_selection
        self.pull_coefficient = pull_coefficient
        self.head_input = head_input

    def prompted(
        self, x: torch.Tensor, query: torch.Tensor, task: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """Select prompts by key, insert them at the input; features and (training) the pull loss."""
        similarity = self.pool.similarity(query)
        batchwise = self.batchwise_selection == "always" or (
            self.batchwise_selection == "train" and self.training
        )
        chosen = select_top_k(similarity, self.top_k, batchwise)
        prompts = self.pool.gather(chosen).flatten(1, 2)  # [B, top_k * length, D]
        tokens = prompted_tokens(self.vit, x, input_prompts=prompts)
        if self.head_input == "prompt":
            features = tokens[:, 1 : 1 + prompts.shape[1]].mean(dim=1)
        else:
            features = tokens[:, 0]
        loss = -self.pull_coefficient * pull_constraint(similarity, chosen) if self.training else None
        return features, loss, None
