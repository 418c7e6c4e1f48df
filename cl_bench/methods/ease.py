"""EASE: Zhou, Sun, Ye, Zhan, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning" (CVPR 2024). Faithful to the official code ``sun-hailong/CVPR24-Ease`` (``6d67508``;
``models/ease.py``, ``backbone/vit_ease.py``, ``backbone/linears.py``, ``utils/inc_net.py::EaseNet``,
``exps/ease_*.json``), the same as LAMDA-PILOT's ``models/ease.py``; spec ``methods_vit.md`` §5.

* Task ``t`` adds one AdaptFormer adapter per block of the frozen ViT (parallel to the MLP, reading the
  residual stream, bottleneck ``adapter_bottleneck`` 64, scale 0.1, dropout 0.1, up-projection zero:
  the adapted model equals the pre-trained one at the start; official ``ffn_adapter_init_option='lora'``).
  Only it trains, with a fresh cosine "proxy" head over task ``t``'s classes (PyCIL ``CosineLinear``,
  learnable ``sigma`` from 1) and cross-entropy over them: SGD momentum 0.9, lr 0.025, weight decay 5e-4,
  batch 48, 20 epochs, cosine to 0 (CIFAR; per-benchmark values in the presets). Then it is frozen.
* Subspace ``s`` = the [CLS] feature (after the final norm) of the ViT run with adapter ``s`` alone; the
  embedding concatenates all subspaces (one forward pass per adapter), with the pre-trained model's as an
  extra first subspace when ``use_init_ptm`` (official CUB and OmniBenchmark configs).
* After task ``t``: each new class's prototype in every subspace = the mean feature of its training images
  (evaluation transform). Old classes have no data in the new subspace; their prototypes there are
  synthesised (:func:`complement_prototypes`, official ``solve_sim_reset`` with ``recalc_sim``): for every
  old task ``i`` and later subspace ``j``, ``P_old^j = softmax_row(cos(P_old^i, P_new^i)) P_new^j``, where
  "new" are the classes of tasks ``j..t`` and ``i`` is task ``i``'s own subspace.
* Prediction (:func:`reweighted_logits`, official ``forward_reweight``): ``logit_c = sum_s w_{c,s}
  cos(f_s, P_c^s)`` with ``w = 1`` in the subspace of ``c``'s own task, ``alpha / t`` (0.1 / t) in the other
  adapter subspaces, ``beta`` in the pre-trained one; ``use_reweight=false``: the plain cosine of the
  concatenations (``self.fc``). Logits cover the classes seen so far, as the official ``fc``.

EASE uses every adapter for every image and chooses no task: no task-selection accuracy. Not implemented:
the official ``moni_adam`` mode (adapters for the first ``adapter_num`` tasks only, OmniBenchmark config),
``use_diagonal`` and ``use_old_data`` (off in every released config). The official ``forward_reweight`` is
written for 768-d features (``out_dim=768`` default); here the subspace width is the backbone's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.modules.analytic_heads import CosineLinear
from cl_bench.modules.peft import AdapterBranch, PetModule
from cl_bench.modules.prompts import timm_vit


# --------------------------------------------------------------------------- maths
def complement_prototypes(
    old_in_old: torch.Tensor, new_in_old: torch.Tensor, new_in_new: torch.Tensor
) -> torch.Tensor:
    """Old classes' prototypes in a new subspace: ``softmax_row(cos(old_in_old, new_in_old)) @ new_in_new``.

    ``old_in_old [n_old, D]`` and ``new_in_old [n_new, D]``: prototypes of old and new classes in the old
    task's subspace; ``new_in_new [n_new, D]``: the new classes' prototypes in the new subspace.
    """
    similarity = F.normalize(old_in_old.float(), dim=1) @ F.normalize(new_in_old.float(), dim=1).T
    return torch.softmax(similarity, dim=1) @ new_in_new.float()


def subspace_weights(
    class_tasks: torch.Tensor, num_subspaces: int, current_task: int, alpha: float, beta: float, offset: int
) -> torch.Tensor:
    """``[C, S]`` weights of each class's cosine in each subspace (official ``forward_reweight``).

    ``class_tasks [C]``: each class's task; subspace ``task + offset`` is the class's own (weight 1);
    with ``offset = 1`` subspace 0 is the pre-trained model's (weight ``beta``); every other subspace gets
    ``alpha / current_task``.
    """
    weights = torch.full((len(class_tasks), num_subspaces), alpha / max(current_task, 1))
    if offset:
        weights[:, 0] = beta
    weights[torch.arange(len(class_tasks)), class_tasks + offset] = 1.0
    return weights


def reweighted_logits(
    features: torch.Tensor, prototypes: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``logit[b, c] = sum_s weights[c, s] * cos(features[b, s], prototypes[c, s])``; ``features [B, S, D]``,
    ``prototypes [C, S, D]``, ``weights [C, S]``."""
    cosines = torch.einsum("bsd,csd->bcs", F.normalize(features, dim=2), F.normalize(prototypes, dim=2))
    return (cosines * weights.to(cosines.dtype).unsqueeze(0)).sum(dim=2)


# --------------------------------------------------------------------------- adapters
class AdapterBank(PetModule):
    """A ViT block's ``norm2`` + MLP with one parallel adapter branch per task (AdaptFormer's, shared with
    :class:`~cl_bench.modules.peft.ParallelAdapter`); ``active`` chooses which (``None``:
    the pre-trained block). Like :class:`~cl_bench.modules.peft.ParallelAdapter`, the block's ``norm2`` moves
    in here because the adapter reads the residual stream before it (official ``Block.forward``)."""

    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.adapters = nn.ModuleList()
        self.active: int | None = None

    def pet_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm(x))
        if self.enabled and self.active is not None:
            out = out + self.adapters[self.active](x)
        return out


# --------------------------------------------------------------------------- method
class EASE(ContinualModule):
    """One adapter subspace per task, prototype classifier over all subspaces with semantic complement.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: the
    adapters and the proxy head train at ``lr``; defaults: official ``ease_cifar.json``):
        epochs, batch_size, lr: 20 epochs of batches of 48 at 0.025 (SGD, momentum 0.9, weight decay 5e-4 and
            a cosine schedule to 0: the base's defaults).
        loss_scope: only ``task`` (the proxy head covers the current task's classes, official).
        adapter_bottleneck, adapter_scale, adapter_dropout: the adapters (official ``ffn_num`` 64, 0.1, 0.1).
        alpha: weight of the other tasks' adapter subspaces at test time (0.1, divided by the task index).
        use_init_ptm, beta: add the pre-trained model's subspace, with weight ``beta`` (off, 0).
        use_reweight: the weighted per-subspace cosine (official); ``false``: plain cosine classifier.
        proxy_sigma: initial scale of the training-time cosine head (1).
    """

    #: The adapters sit in timm ViT blocks.
    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})
    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        adapter_bottleneck: int = 64,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.1,
        alpha: float = 0.1,
        use_init_ptm: bool = False,
        beta: float = 0.0,
        use_reweight: bool = True,
        proxy_sigma: float = 1.0,
        epochs: int = 20,
        batch_size: int = 48,
        lr: float = 0.025,
        loss_scope: str = "task",
        **base_args: Any,
    ) -> None:
        if adapter_bottleneck < 1 or not 0.0 <= adapter_dropout < 1.0:
            raise ConfigError("method.adapter_bottleneck must be >= 1 and method.adapter_dropout in [0, 1)")
        if loss_scope != "task":
            raise ConfigError(
                "method.loss_scope: EASE trains each adapter with a proxy head over the current task's "
                "classes only (official); use method.loss_scope=task"
            )
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            loss_scope=loss_scope,
            **base_args,
        )
        vit = timm_vit(backbone)
        dim = int(vit.embed_dim)
        self.backbone.requires_grad_(False)
        self.banks = nn.ModuleList()
        for block in vit.blocks:
            bank = AdapterBank(block.norm2, block.mlp)
            block.norm2 = nn.Identity()
            block.mlp = bank
            self.banks.append(bank)
        self.adapter_args = {
            "dim": dim,
            "bottleneck": adapter_bottleneck,
            "scale": adapter_scale,
            "dropout": adapter_dropout,
        }
        self.alpha = alpha
        self.beta = beta
        self.use_init_ptm = use_init_ptm
        self.use_reweight = use_reweight
        self.proxy_sigma = proxy_sigma
        self.proxy: CosineLinear | None = None
        #: ``[C, S, D]``: each seen class's prototype in every subspace; ``class_tasks [C]``: its task.
        self.register_buffer("prototypes", torch.zeros(0, 0, dim))
        self.register_buffer("class_tasks", torch.zeros(0, dtype=torch.long))

    def build_head(self) -> nn.Module:
        """No trained classifier: prediction uses the prototypes, training a per-task proxy head."""
        return nn.Identity()

    @property
    def offset(self) -> int:
        """Index of task 0's subspace: 1 when the pre-trained model's subspace comes first."""
        return int(self.use_init_ptm)

    @property
    def num_adapters(self) -> int:
        return len(self.banks[0].adapters)

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """A new adapter per block (older ones frozen) and a fresh proxy head over the task's classes."""
        self.task = ctx.task
        self.task_incremental = ctx.scenario.task_incremental
        if ctx.task.index != self.num_adapters:
            raise RuntimeError(
                f"tasks must be learned in order: task {ctx.task.index} after {self.num_adapters}"
            )
        for bank in self.banks:
            bank.adapters.requires_grad_(False)
            bank.adapters.append(AdapterBranch(**self.adapter_args))
            bank.active = ctx.task.index
        self.proxy = CosineLinear(self.adapter_args["dim"], self.proxy_sigma)
        self.proxy.add_task(ctx.task.num_classes)

    def on_task_end(self, ctx: TaskContext) -> None:
        """Prototypes of the new classes in every subspace, then the complement of the old ones."""
        assert self.task is not None
        for bank in self.banks:
            bank.adapters.requires_grad_(False)
        self.proxy = None
        features, labels = self.extract_features(ctx, ctx.train_eval_set, embed=self.embed)
        classes = torch.arange(self.task.start, self.task.stop)
        if not torch.isin(classes, labels).all():
            raise RuntimeError(f"task {self.task.index} has classes without training images: no prototype")
        new = torch.stack([features[labels == c].mean(dim=0) for c in classes])  # [n, S*D]
        subspaces = self.num_adapters + self.offset
        dim = self.adapter_args["dim"]
        old = self.prototypes
        if old.shape[1] < subspaces:  # the new adapter's subspace: filled by the complement below
            old = torch.cat([old, old.new_zeros(len(old), subspaces - old.shape[1], dim)], dim=1)
        self.prototypes = torch.cat([old, new.view(len(classes), subspaces, dim).to(old)])
        self.class_tasks = torch.cat(
            [self.class_tasks, torch.full((len(classes),), self.task.index).to(self.class_tasks)]
        )
        self.complement()

    def complement(self) -> None:
        """Official ``solve_sim_reset``: every old task's prototypes in every later adapter subspace."""
        assert self.task is not None
        for old_task in range(self.task.index):
            own = old_task + self.offset
            old_rows = self.class_tasks == old_task
            for later in range(old_task + 1, self.task.index + 1):
                new_rows = self.class_tasks >= later
                self.prototypes[old_rows, later + self.offset] = complement_prototypes(
                    self.prototypes[old_rows, own],
                    self.prototypes[new_rows, own],
                    self.prototypes[new_rows, later + self.offset],
                ).to(self.prototypes)

    # ----------------------------------------------------------------- inference
    def subspace_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, D]``: the [CLS] feature with each adapter (after the pre-trained model's, if used)."""
        sources: list[int | None] = ([None] if self.use_init_ptm else []) + list(range(self.num_adapters))
        outputs = []
        for source in sources:
            for bank in self.banks:
                bank.active = source
            outputs.append(self.backbone(x))
        return torch.stack(outputs, dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """All subspaces concatenated, ``[B, S * D]``."""
        return self.subspace_features(x).flatten(1)

    def classify(self, features: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits over the seen classes from :meth:`embed`'s output."""
        assert self.task is not None
        subspaces = features.view(len(features), -1, self.adapter_args["dim"])
        if not self.use_reweight:
            return F.normalize(features, dim=1) @ F.normalize(self.prototypes.flatten(1), dim=1).T.to(
                features
            )
        weights = subspace_weights(
            self.class_tasks, subspaces.shape[1], self.task.index, self.alpha, self.beta, self.offset
        )
        return reweighted_logits(subspaces, self.prototypes.to(subspaces), weights.to(subspaces.device))

    # ----------------------------------------------------------------- training
    def training_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The proxy head over the current task's classes on the current adapter's feature."""
        assert self.task is not None and self.proxy is not None
        for bank in self.banks:
            bank.active = self.task.index
        return self.proxy(self.backbone(inputs))

    def task_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The proxy head already covers the current task's classes only."""
        assert self.task is not None
        return logits, targets - self.task.start

    def param_groups(self) -> list[dict[str, Any]]:
        """The current adapters and the proxy head, at ``lr``."""
        assert self.task is not None and self.proxy is not None
        adapters = [p for bank in self.banks for p in bank.adapters[self.task.index].parameters()]
        return [{"params": [*adapters, *self.proxy.parameters()], "lr": self.lr, "name": "adapter_proxy"}]

    def structure(self) -> dict[str, Any]:
        """The base's, plus the number of adapters per block (one per task learned or begun)."""
        return {**super().structure(), "adapters": self.num_adapters}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Add the saved number of adapters to every block (their values come with the ``state_dict``;
        the prototypes are buffers resized on load)."""
        super().restore_structure(structure)
        for bank in self.banks:
            for _ in range(int(structure["adapters"]) - len(bank.adapters)):
                bank.adapters.append(AdapterBranch(**self.adapter_args))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("prototypes", "class_tasks"):  # resize to the saved shapes before copying
            if prefix + name in state_dict:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
