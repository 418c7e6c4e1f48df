"""LayerNorm tuning with task keys (two-stage variant, and the single-stage variant: ``stages=single``).

De Min, Mancini, Alahari, Alameda-Pineda, Ricci, "On the Effectiveness of LayerNorm Tuning for Continual
Learning in Vision Transformers" (ICCV-W 2023, arXiv 2308.09610). Only the abstract of the paper could be
read; everything below follows the official code ``tdemin16/Continual-LayerNorm-Tuning`` (HEAD ``5cc3b78``,
``train_two.sh``) as specified in ``shared/research/methods_vit.md`` §4 (section numbers below refer to it).

Model (§4.2): the pre-trained backbone is frozen except for one set of LayerNorm scales and biases per task
(:class:`~cl_bench.methods.norm_sets.NormSets`: every ``nn.LayerNorm`` of the backbone, 25 in ViT-B/16);
set ``t`` starts as a copy of set ``t-1`` (task 0: the pre-trained values). Each task also has a key
(:class:`~cl_bench.methods.task_keys.TaskKeys`, orthogonal initialisation, ``--new_key``). Two linear heads
grow with the tasks: ``fake_head`` is trained with the LayerNorm sets, ``head`` (the one evaluated) only in
the classifier rectification (official ``--unbiased``).

Training task ``c`` (§4.3), three phases (:class:`~cl_bench.methods.base.Phase`, one Lightning fit each):

1. keys, ``key_epochs`` (official: ``epochs``): ``q`` = the frozen pre-trained model's embedding of the
   augmented image (the [CLS] token after the final LayerNorm for a timm ViT), loss ``-mean_b cos(q_b, k_c)``;
2. LayerNorms, ``epochs``: set ``c`` in every LayerNorm for every image (the ground-truth task), logits of
   ``fake_head`` restricted to task ``c``'s classes (``loss_scope=task``: the official logit mask),
   cross-entropy; trains set ``c`` and ``fake_head``'s block ``c``. Steps 1-2 share one optimiser in the
   official code; here each has a fresh Adam over the same parameters, which is the same: the two stages'
   gradients fall on disjoint parameters and Adam's state is per parameter.
3. classifier rectification, ``rectification_epochs``: a new optimiser at ``rectification_lr`` on ``head``
   only; features come, without gradient, from the model with the sets that the keys *select* (the
   inference-time selection), so the head learns to live with wrong selections. Logits restricted to task
   ``c``'s classes, cross-entropy.

Every task gets fresh optimisers (Lightning builds them per fit), and older sets, keys and head blocks are
frozen tensors of their own, so their update is exactly zero whatever the optimiser (§4.8 pitfalls 1-2).

Inference without a task id (§4.4): ``q`` from the frozen pass, ``t_hat = argmax_{t<=c} cos(q, k_t)`` per
image, then one batched pass in which each image uses its own set ``t_hat`` (per-image affine parameters, no
per-image loop and no per-task re-run), and ``head`` over all seen classes. Two backbone passes per image,
as in the official code: the query pass uses the pre-trained LayerNorms from the first block on, so no layer
after the patch embedding can be shared with the tuned pass. With a task id (task-incremental scenarios, or
an oracle) only the tuned pass runs, with that task's set. :meth:`predict` returns ``t_hat`` so the
evaluator reports the task-selection accuracy (official "Acc_Task").

Single-stage variant (``stages=single``, official ``train_single.sh``: ``--method single_stage --unbiased
--use_att``, §4.3-4.4): no frozen query pass and no key phase. Every LayerNorm has its own keys and attention
vectors (:class:`~cl_bench.methods.task_keys.AttendedKeys`, orthogonal, official ``--use_att``). Phases:

1. ``norms``, ``epochs``: set ``c`` in every LayerNorm (the ground-truth task), loss ``CE - S`` where ``S``
   averages ``mean_b cos(a_c * x_b[CLS], k_c)`` over the LayerNorms (``x``: each one's input; a block's two
   LayerNorms are averaged first, then the 12 blocks and the final norm: 13 terms), with gradients into the
   features (official ``--detach_selection`` off); trains set ``c``, every layer's ``k_c`` and ``a_c`` and
   ``fake_head``'s block ``c``;
2. ``rectify`` as above, with features from the inference-time selection.

At inference each LayerNorm selects, per image, ``argmax_{t<=c} cos(a_t * x[CLS], k_t)`` on its own input
(one backbone pass). ``new_key`` defaults (``None``) to the official scripts': ``--new_key`` for two stages,
copies of the previous task's keys and attention vectors for a single stage. There is no single chosen task
per image, so no task-selection accuracy is reported (``selects_task`` is off).

Deviations from the official code (each with the switch that restores it, where one exists):

* the backbone stays in eval mode while training (the official LN stage calls ``model.train()``); the same
  as long as ``backbone.drop_path_rate=0`` and dropout 0, the official setting;
* no input normalisation in the official data pipeline; cl_bench normalises with the backbone's mean/std
  (0.5/0.5 for the augreg ViT-B/16, i.e. inputs in [-1, 1]): the presets say how to restore it;
* the heads are one ``nn.Linear`` block per task (official: one linear layer over all classes, created up
  front); each block starts as timm's ``init_weights_vit_timm`` initialises the official head (weights
  ``trunc_normal(std=0.02)``, bias 0; the pre-trained head is not loaded for a new number of classes), and
  ``fake_head``'s block starts equal to ``head``'s, as the official ``deepcopy``;
* single stage: the per-layer query is the first token of the LayerNorm's input (timm ViT: [CLS], as the
  official ``x[:, 0]``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import Capabilities, ContinualModule, Phase, Prediction, TaskContext, freeze
from cl_bench.methods.norm_sets import PER_LAYER, NormSets
from cl_bench.methods.task_keys import KEY_INITS, TaskKeys
from cl_bench.modules.heads import IncrementalLinearHead

log = logging.getLogger(__name__)

LN_INITS = ("previous", "pretrained")
#: The phases of each variant (``stages``).
STAGES = {"two": ("keys", "norms", "rectify"), "single": ("norms", "rectify")}


class LayerNormTuning(ContinualModule):
    """Per-task LayerNorm scale/bias sets on a frozen backbone, chosen at test time by task keys.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: the
    backbone is frozen; defaults from the official CIFAR-100 config ``couple/configs/cifar100.py``, §4.5):
        epochs: epochs of the LayerNorm stage (official ``epochs`` = 5).
        batch_size: 128 (official).
        lr: learning rate of the key and LayerNorm stages: the official 0.005 scaled by batch/256 = 0.0025
            (ImageNet-R: 0.01 -> 0.005).
        stages: ``two`` (``train_two.sh``: a key phase, then the LayerNorm phase) or ``single``
            (``train_single.sh``: per-LayerNorm keys trained with the LayerNorms; module docstring).
        key_epochs: epochs of the key stage; ``None``: ``epochs`` (official, one ``epochs`` for both).
        key_init: ``orthogonal`` (official default) or ``uniform``.
        new_key: each task's key starts from its own initial row (official ``--new_key`` in ``train_two.sh``);
            ``False``: from a copy of the previous key; ``None``: the official script's choice (two stages:
            ``True``, single stage: ``False``).
        ln_init: ``previous``: set ``t`` starts as a copy of set ``t-1`` (official ``next_task``);
            ``pretrained``: from the pre-trained values.
        rectification_epochs: epochs of classifier rectification (official ``epochs_unbiased`` = 5);
            0: no rectification and no second head, the LayerNorm stage trains ``head`` itself (official
            without ``--unbiased``).
        rectification_lr: its learning rate (official ``lr_unbiased`` = 1e-3, not batch-scaled).
        optimizer, weight_decay: Adam without weight decay (official); also used by the rectification.
        scheduler: only ``none`` (the official constant learning rate).
        loss_scope: ``task`` (official logit mask: the current task's classes) or ``seen``.
    """

    CAPABILITIES = Capabilities(task_conditioned=True, selects_task=True)
    backbone_needs: ClassVar[frozenset[str]] = frozenset({"layernorm"})  # one LayerNorm set per task
    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 5,
        batch_size: int = 128,
        lr: float = 0.0025,
        stages: str = "two",
        key_epochs: int | None = None,
        key_init: str = "orthogonal",
        new_key: bool | None = None,
        ln_init: str = "previous",
        rectification_epochs: int = 5,
        rectification_lr: float = 0.001,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        scheduler: str = "none",
        loss_scope: str = "task",
        **base_args: Any,
    ) -> None:
        if stages not in STAGES:
            raise ConfigError(f"method.stages={stages!r}: choose one of {list(STAGES)}")
        if key_init not in KEY_INITS:
            raise ConfigError(f"method.key_init={key_init!r}: choose one of {list(KEY_INITS)}")
        if ln_init not in LN_INITS:
            raise ConfigError(f"method.ln_init={ln_init!r}: choose one of {list(LN_INITS)}")
        if scheduler != "none":
            raise ConfigError(
                f"method.scheduler={scheduler!r}: LayerNorm tuning trains with a constant learning rate "
                "(official); use method.scheduler=none"
            )
        key_epochs = epochs if key_epochs is None else key_epochs
        if key_epochs < 0 or rectification_epochs < 0 or rectification_lr < 0:
            raise ConfigError("method.key_epochs, rectification_epochs and rectification_lr must be >= 0")
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            scheduler=scheduler,
            loss_scope=loss_scope,
            **base_args,
        )
        freeze(self.backbone)
        self.norm_sets = NormSets(self.backbone)
        self.stages = stages
        self.key_init = key_init
        self.new_key = stages == "two" if new_key is None else new_key
        self.ln_init = ln_init
        self.rectification_lr = rectification_lr
        #: Epochs of each stage (phase).
        self.stage_epochs = {"keys": key_epochs, "norms": epochs, "rectify": rectification_epochs}
        self.stage_names = STAGES[stages]
        #: Built at the first task, when the number of tasks (for the orthogonal keys) is known.
        self.keys: TaskKeys | None = None
        #: Trained with the LayerNorm sets when the head is rectified afterwards (official ``fake_head``).
        self.fake_head = IncrementalLinearHead(self.backbone.feat_dim) if rectification_epochs else None

    @property
    def capabilities(self) -> Capabilities:
        """The single stage selects per LayerNorm: no one chosen task per image to report."""
        return self.CAPABILITIES if self.stages == "two" else Capabilities(task_conditioned=True)

    def eval_mode_modules(self) -> Iterable[nn.Module]:
        """The backbone stays in eval mode (dropout and drop-path off; the official rates are 0)."""
        return (self.backbone,)

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Grow the heads; add task ``c``'s LayerNorm set and key; freeze the earlier ones."""
        super().on_task_start(ctx)
        index = ctx.task.index
        if index != self.norm_sets.num_sets:
            raise RuntimeError(
                f"tasks must be learned in order: task {index} after {self.norm_sets.num_sets}"
            )
        if self.keys is None and self.norm_sets.layers[0].selector is None:  # the first task: build them
            if self.stages == "two":
                self.keys = TaskKeys(self.backbone.feat_dim, len(ctx.scenario.tasks), self.key_init)
            else:
                self.norm_sets.add_selectors(len(ctx.scenario.tasks), self.key_init)
            log.info(
                "LayerNorm tuning: %d LayerNorms, %d parameters per task",
                len(self.norm_sets.layers),
                self.norm_sets.params_per_set,
            )
        self.norm_sets.add_set(None if index == 0 or self.ln_init == "pretrained" else index - 1)
        if self.keys is not None:
            self.keys.add_key(copy_previous=not self.new_key)
        else:
            self.norm_sets.add_selector_keys(copy_previous=not self.new_key)
        new_block = self.head.blocks[-1]
        with torch.no_grad():  # timm's init_weights_vit_timm, as the official head
            nn.init.trunc_normal_(new_block.weight, std=0.02)
            nn.init.zeros_(new_block.bias)
        if self.fake_head is not None:
            self.fake_head.add_task(ctx.task.num_classes).load_state_dict(new_block.state_dict())
        if self.loss_scope == "task" or self.task_incremental:  # old blocks get no gradient: freeze them
            for head in (self.head, self.fake_head):
                for block in head.blocks[:-1] if head is not None else ():
                    block.requires_grad_(False)

    def structure(self) -> dict[str, Any]:
        """Also: the number of tasks the keys were drawn for and the LayerNorm sets learnt so far."""
        return {
            **super().structure(),
            "key_tasks": None if self.keys is None else len(self.keys.initial),
            "sets": self.norm_sets.num_sets,
        }

    def restore_structure(self, structure: dict[str, Any]) -> None:
        super().restore_structure(structure)
        if structure["key_tasks"] is not None:
            self.keys = TaskKeys(self.backbone.feat_dim, structure["key_tasks"], self.key_init)
            for _ in range(structure["sets"]):
                self.keys.add_key()
        for _ in range(structure["sets"]):
            self.norm_sets.add_set(None)

    # ----------------------------------------------------------------- inference
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen pre-trained model's embedding (pre-trained LayerNorm parameters), the keys' query."""
        with torch.no_grad(), self.norm_sets.selected(None):
            return self.backbone(x)

    def embed(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """The embedding with LayerNorm set ``task`` (an int, or one per image); ``None``: key-selected."""
        if task is None:
            return self.selected_embedding(x)[0]
        with self.norm_sets.selected(task):
            return self.backbone(x)

    def selected_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding with each image's key-selected set, and the selected tasks ``[B]`` (single stage:
        each LayerNorm's own selection, and ``None``)."""
        if self.stages == "single":
            with self.norm_sets.selected(PER_LAYER):
                return self.backbone(x), None
        assert self.keys is not None, "no task has started yet"
        tasks = self.keys.select(self.query(x))
        return self.embed(x, tasks), tasks

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits of ``head`` over all seen classes; ``task`` given: that task's set (oracle selection)."""
        if task is None:
            return self.predict(x).logits
        return self.head(self.embed(x, task))

    def predict(self, x: torch.Tensor) -> Prediction:
        """Logits with the key-selected sets, and the selected task of each image."""
        features, tasks = self.selected_embedding(x)
        return Prediction(self.head(features), chosen_task=tasks)

    # ----------------------------------------------------------------- training
    def phases(self, ctx: TaskContext) -> list[Phase]:
        """``keys``, ``norms``, ``rectify`` (module docstring, steps 1-3; single stage: ``norms`` and
        ``rectify``), all on the task's images, each training only its own parameters
        (:meth:`param_groups`)."""
        return [
            Phase(
                name,
                self.stage_epochs[name],
                ctx.train_set,
                self.batch_size,
                trainable=self.stage_parameters(name),
            )
            for name in self.stage_names
        ]

    def stage_parameters(self, stage: str) -> tuple[nn.Parameter, ...]:
        """What ``stage`` trains: task ``c``'s key; task ``c``'s LayerNorm set (single stage: and every
        LayerNorm's key and attention vector ``c``) and the trained head's block (``fake_head`` if the head is
        rectified afterwards); ``head``'s trainable blocks."""
        assert self.task is not None
        if stage == "keys":
            assert self.keys is not None
            return (self.keys.keys[self.task.index],)
        head = self.head if self.fake_head is None or stage == "rectify" else self.fake_head
        trained = tuple(p for p in head.parameters() if p.requires_grad)
        if stage == "rectify":
            return trained
        selectors = self.norm_sets.selector_parameters(self.task.index) if self.stages == "single" else []
        return (*self.norm_sets.parameters_of(self.task.index), *selectors, *trained)

    def stage_loss(self, stage: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch in ``stage`` (module docstring, steps 1-3)."""
        assert self.task is not None
        if stage == "keys":
            assert self.keys is not None
            return self.keys.pull_loss(self.query(x), self.task.index)
        if stage == "norms":
            head = self.head if self.fake_head is None else self.fake_head
            logits, targets = self.task_logits(head(self.embed(x, self.task.index)), y)
            loss = F.cross_entropy(logits, targets)
            return loss - self.norm_sets.mean_match() if self.stages == "single" else loss
        with torch.no_grad():
            features, _ = self.selected_embedding(x)
        logits, targets = self.task_logits(self.head(features), y)
        return F.cross_entropy(logits, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        stage = self.phase_name
        loss = self.stage_loss(stage, x, y)
        self.check_finite(loss, batch_idx)
        self.log(f"train/{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """The phase's :meth:`stage_parameters`, at ``rectification_lr`` when rectifying, else at ``lr``."""
        lr = self.rectification_lr if self.phase_name == "rectify" else self.lr
        return [{"params": list(self.stage_parameters(self.phase_name)), "lr": lr, "name": self.phase_name}]
