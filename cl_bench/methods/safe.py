"""SAFE: Zhao, Zhang, Yan, Ding, Huang, "SAFE: Slow and Fast Parameter-Efficient Tuning for Continual
Learning with Pre-Trained Models" (NeurIPS 2024, arXiv 2411.02175). Read from the official code
``MIFA-Lab/SAFE`` ``SAFE.py``/``inc_net.py`` (spec ``shared/research/methods_vit.md`` §3; the paper's body
was not readable, so section numbers are not cited).

**Session 1 (slow learner).** A PET module (:mod:`cl_bench.modules.peft`: adapter for CIFAR, SSF for IN-A)
on the frozen pre-trained model (PTM) is trained with a cosine head (``sigma`` 10) and::

    L = CE + diag_weight * sum_i (c_ii - 1)^2 + redundancy_weight * sum_{i != j} c_ij^2,
    c = s^T t / B,  s = normalize(f_PET(x)), t = normalize(f_PTM(x))   (rows L2-normalised per sample)

the transfer loss (``slow_cm``; the PTM pass is the same backbone with PET off, in eval mode, no grad).
The trained model is then copied, frozen and kept as the **slow learner** (backbone and cosine head).
Both cosine heads' ``sigma`` then go back to their initial value (10), as the code's ``setup_RP`` and
``setup_RP_branch`` call ``fc.reset_parameters()`` after session 1: the slow learner's ``sigma`` is 10 for
good, and the fast learner starts session 2 at 10 (it trains ``sigma`` from then on and carries it over).

**Sessions t > 1 (fast learner).** The original keeps training (``later_epochs`` 15, on a cosine schedule
whose period stays the first session's 20 epochs, as the code's ``T_max=tuned_epoch``) with::

    L = CE(all seen classes) + align_weight * sum_b (1 - cos(f_fast(x_b), f_slow(x_b)))
        + cross_weight * [CE(W_fast; [W_slow[:K]; f_slow(x)], [0..K-1; y])
                          + CE(W_slow; [W_fast[:K]; f_fast(x)], [0..K-1; y])]

``K`` the number of old classes, ``W`` the cosine heads' weights used as old-class prototypes; the
alignment is a *sum* over the batch. The fast cosine head keeps ``sigma`` and grows by zero rows; the slow
one grows by zero rows that are never trained (``imprint_slow_protos=true`` sets them to the slow
features' class means instead, the figure's "(Imprinted)" W_slow).

**Classifiers.** After every session each learner has a RanPAC head
(:class:`~cl_bench.modules.analytic_heads.RandomProjectionRidgeHead`, ``M`` 10000, lambda in ``10^{3..8}``)
on its features of the session's training images (evaluation transform); its logits are multiplied by the
learner's cosine ``sigma``. Both heads project with **one** ``W_rand``: ``setup_RP_branch`` draws a second
matrix, but ``replace_fc_branch`` overwrites the slow head's with the fast one (``fc.W_rand = self.W_rand``)
before every fit and the second is never used (``independent_projections=true``: one each).
``ridge_stats=shared`` (code): both heads add to and solve from one ``G``/``Q`` (fast first, then slow);
``separate``: one each.

**Inference.** ``z = w_f z_fast + w_s z_slow`` with ``[w_f, w_s] = softmax(-gamma [H(z_fast), H(z_slow)])``,
``H(z) = -sum p log(p + 1e-9)``, ``p = softmax(z)``; after the first session only the fast learner is used.
The official ``eval_task`` then keeps the better of the aggregate and the fast learner *measured with the
test labels*; cl_bench does not: ``forward`` is the aggregate (the method's result) and the fast learner's
and slow learner's accuracies are reported beside it (:meth:`SAFE.predict`'s alternatives ``fast``, ``slow``).

**Domain-incremental scenarios** (``scenario=dil``; the DIL branch of the code's ``trainer.py``, taken from
RanPAC: DomainNet's domains real, quickdraw, painting, sketch, infograph, clipart, 345 classes each). Every
task holds all classes, so the heads cover all of them from the first domain on and never grow. The trainer
resets ``_cur_task`` to -1 and ``_known_classes`` to 0 before each domain and sets ``dil_init`` after the
first, so the code runs session 1 (slow learner, transfer loss, cosine head over all classes, then both
``sigma`` reset and the RanPAC heads set up) on the first domain only, and for every later domain *no training
at all*: the fast learner stays the slow learner's copy, both ridge heads add the domain's features to the
shared ``G``/``Q`` and are re-solved, and ``eval_task`` (``_cur_task`` is 0 again) predicts with the fast
learner alone, never the aggregate. That is the default here (``domain_sessions=heads_only``);
``domain_sessions=train_fast`` instead trains the fast learner on each later domain like a later CIL session
(``later_epochs``, alignment and cross-classification against every class's slow prototype) and aggregates,
which the code never does. The code reports top-1 on the union of all six domains' test sets after every
domain (RanPAC's ``domainnet`` loader puts every domain's test list in each domain's test set); cl_bench's DIL
evaluation gives every domain's accuracy and ``last_acc`` is that union's (:mod:`cl_bench.metrics`). The code
also rebuilds the pre-trained model for the transfer loss at every domain, which changes nothing.
The branch cannot run as released: SAFE@c043ce3's ``utils/data_manager.py`` knows only ``cifar224`` and
``imageneta``, and at the second domain ``update_fc`` would concatenate the 345 x M ridge weights with a
0 x 768 block, which PyTorch refuses (checked with 2.14; RanPAC deletes the head first). cl_bench follows the
branch's evident intent, and RanPAC's data side, which SAFE says it follows.

Ablation switches: each loss weight (0 turns it off), ``aggregation`` (``entropy``, ``fast``, ``slow``,
``add``, ``max``), ``later_epochs=0`` (no fast learner), ``ridge_stats``, ``imprint_slow_protos``,
``domain_sessions`` (DIL).

Deviations from the official code (each with the switch that gives the other behaviour):

* no selection between the aggregate and the fast learner with test labels (above; no switch: the fast and
  slow learners' accuracies are reported beside the aggregate instead);
* ``share_forward_pass=true`` reuses the CE pass's features for the transfer/alignment losses instead of
  the code's second forward pass (faster; differs through the adapter's dropout); default off, as the code;
* under DIL, later domains reuse the fast learner's features for the slow head instead of a second pass
  through the identical slow copy (the same numbers, one pass less); ``domain_sessions=train_fast`` is not
  the code (above);
* ``reset_sigma=false`` keeps the trained session-1 ``sigma`` in both learners,
  ``independent_projections=true`` uses the second ``W_rand`` that ``setup_RP_branch`` draws, and
  ``ridge_stats=separate`` and ``imprint_slow_protos=true`` follow the paper's figure: all four differ from
  the code, whose behaviour is the default.

Defaults are the released CIFAR-100 config (``args/cifar224_publish.csv``); the ImageNet-A one
(``imageneta_publish.csv``) is in ``cl_bench/conf/experiment/safe/imagenet_a.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import Capabilities, ContinualModule, Phase, Prediction, TaskContext
from cl_bench.modules.analytic_heads import CosineLinear, RandomProjectionRidgeHead, ridge_grid
from cl_bench.modules.peft import attach_peft, freeze_all_but_peft, independent_copy, peft_disabled

AGGREGATIONS = ("entropy", "fast", "slow", "add", "max")
RIDGE_STATS = ("shared", "separate")
DOMAIN_SESSIONS = ("heads_only", "train_fast")


def transfer_loss(
    features: torch.Tensor, pretrained: torch.Tensor, diag_weight: float, redundancy_weight: float
) -> torch.Tensor:
    """SAFE's slow-learner loss on the cross-correlation ``c = s^T t / B`` of L2-normalised features.

    ``diag_weight * sum_i (c_ii - 1)^2 + redundancy_weight * sum_{i != j} c_ij^2``.
    """
    s = F.normalize(features.float(), dim=1)
    t = F.normalize(pretrained.float(), dim=1)
    c = s.T @ t / features.shape[0]
    diagonal = torch.diagonal(c)
    on_diag = (diagonal - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diagonal.pow(2).sum()
    return diag_weight * on_diag + redundancy_weight * off_diag


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_c p_c log(p_c + 1e-9)`` per row, ``p = softmax(logits)`` (the code's epsilon)."""
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p + 1e-9)).sum(dim=1)


def aggregation_weights(fast: torch.Tensor, slow: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[w_fast, w_slow] = softmax(-gamma [H(fast), H(slow)])`` per row: ``[B, 2]``, rows sum to one."""
    return torch.softmax(-gamma * torch.stack([entropy(fast), entropy(slow)], dim=1), dim=1)


def aggregate(fast: torch.Tensor, slow: torch.Tensor, mode: str, gamma: float) -> torch.Tensor:
    """The prediction of ``mode`` from the two learners' logits."""
    if mode == "entropy":
        weights = aggregation_weights(fast, slow, gamma).to(fast.dtype)
        return weights[:, :1] * fast + weights[:, 1:] * slow
    if mode == "add":
        return fast + slow
    if mode == "max":
        return torch.maximum(fast, slow)
    return fast if mode == "fast" else slow


class SAFE(ContinualModule):
    """Slow learner (PET trained on session 1 with the transfer loss, then frozen) and fast learner (the same
    PET trained on); RanPAC heads; entropy-weighted aggregation (module docstring).

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s; defaults: ``args/cifar224_publish.csv``):
        epochs: session 1's (``tuned_epoch`` 20), also the cosine schedule's period in every session.
        batch_size: 48.
        peft, adapter_bottleneck, adapter_scale, adapter_dropout, prompt_tokens: the PET module
            (:func:`~cl_bench.modules.peft.attach_peft`).
        cosine_sigma: initial scale of the cosine head (10 in SAFE's ``inc_net.py``).
        later_epochs: epochs of the fast learner in sessions t > 1 (``follow_epoch``).
        diag_weight, redundancy_weight: ``slow_diag``, ``slow_rdn``.
        align_weight: ``fast_disf`` (the alignment is summed over the batch).
        cross_weight: ``fast_cc``.
        aggregation: ``entropy`` (``merge_result``), or ``fast``, ``slow``, ``add``, ``max``.
        gamma: the entropy temperature (``scalar_val``).
        rp_dim, ridge_exponents: the RanPAC heads' ``M`` and lambda grid ``10^low..10^high``.
        ridge_stats: ``shared`` (code) or ``separate`` ``G``/``Q`` for the two heads.
        imprint_slow_protos: set the slow cosine head's new rows to class means (default: zero, as the code).
        share_forward_pass: reuse the CE pass's features for the extra losses (default: a second pass).
        reset_sigma: after session 1, set both cosine heads' ``sigma`` back to ``cosine_sigma`` (code).
        independent_projections: give the slow head its own ``W_rand`` (default: the fast one's, as the code).
        domain_sessions: under DIL, what the domains after the first do: ``heads_only`` (code: refit the
            ridge heads, predict with the fast learner) or ``train_fast`` (train and aggregate as in CIL).
    """

    CAPABILITIES = Capabilities(domain_incremental=True)
    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})  # its PET module (no peft=none)

    def __init__(
        self,
        backbone: Backbone,
        peft: str = "adapter",
        adapter_bottleneck: int = 64,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.1,
        prompt_tokens: int = 5,
        cosine_sigma: float = 10.0,
        later_epochs: int = 15,
        diag_weight: float = 5e-10,
        redundancy_weight: float = 5e-9,
        align_weight: float = 0.5,
        cross_weight: float = 1.0,
        aggregation: str = "entropy",
        gamma: float = 1.0,
        rp_dim: int = 10000,
        ridge_exponents: tuple[int, int] | list[int] = (3, 8),
        ridge_stats: str = "shared",
        imprint_slow_protos: bool = False,
        share_forward_pass: bool = False,
        reset_sigma: bool = True,
        independent_projections: bool = False,
        domain_sessions: str = "heads_only",
        epochs: int = 20,
        batch_size: int = 48,
        **base_args: Any,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"method.aggregation={aggregation!r}: choose one of {list(AGGREGATIONS)}")
        if ridge_stats not in RIDGE_STATS:
            raise ConfigError(f"method.ridge_stats={ridge_stats!r}: choose one of {list(RIDGE_STATS)}")
        if domain_sessions not in DOMAIN_SESSIONS:
            raise ConfigError(
                f"method.domain_sessions={domain_sessions!r}: choose one of {list(DOMAIN_SESSIONS)}"
            )
        if min(diag_weight, redundancy_weight, align_weight, cross_weight) < 0 or later_epochs < 0:
            raise ConfigError("SAFE's loss weights and method.later_epochs must be >= 0")
        if peft == "none":
            raise ConfigError("SAFE needs a PET module: method.peft=adapter|ssf|vpt")
        if len(ridge_exponents) != 2:
            raise ConfigError(f"method.ridge_exponents={list(ridge_exponents)}: give [low, high]")
        super().__init__(backbone, epochs=epochs, batch_size=batch_size, **base_args)
        attach_peft(backbone, peft, adapter_bottleneck, adapter_scale, adapter_dropout, prompt_tokens)
        freeze_all_but_peft(backbone)
        self.later_epochs = later_epochs
        self.diag_weight = diag_weight
        self.redundancy_weight = redundancy_weight
        self.align_weight = align_weight
        self.cross_weight = cross_weight
        self.aggregation = aggregation
        self.gamma = gamma
        self.ridge_stats = ridge_stats
        self.imprint_slow_protos = imprint_slow_protos
        self.share_forward_pass = share_forward_pass
        self.cosine_sigma = cosine_sigma
        self.reset_sigma = reset_sigma
        self.domain_sessions = domain_sessions
        ridges = ridge_grid(*ridge_exponents)
        self.cosine_head = CosineLinear(backbone.feat_dim, cosine_sigma)
        self.head: nn.Module = RandomProjectionRidgeHead(backbone.feat_dim, rp_dim, ridges)
        self.slow_head = RandomProjectionRidgeHead(backbone.feat_dim, rp_dim, ridges)
        if not independent_projections:  # the code's replace_fc_branch: the slow head uses W_rand
            self.slow_head.projection.copy_(self.head.projection)
        #: The slow learner (a frozen copy of backbone and cosine head), made at the end of session 1.
        self.slow_backbone: nn.Module | None = None
        self.slow_cosine: CosineLinear | None = None

    def eval_mode_modules(self) -> Iterable[nn.Module]:
        """The slow learner stays in eval mode."""
        return [m for m in (self.slow_backbone, self.slow_cosine) if m is not None]

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Grow the heads by the task's new classes (the cosine head's new rows: uniform in session 1, zero
        later; under DIL only the first domain brings classes)."""
        super().on_task_start(ctx)
        new = ctx.task.new_classes
        if not new:
            return
        self.slow_head.add_task(new)
        first = ctx.task.index == 0
        self.cosine_head.add_task(new, init="uniform" if first else "zeros")
        if self.slow_cosine is not None:
            self.slow_cosine.add_task(new, init="zeros")

    @property
    def fast_learner_frozen(self) -> bool:
        """Under DIL with ``domain_sessions=heads_only`` (the code) the fast learner is never trained after
        the first domain: it stays the slow learner's copy and predicts alone."""
        return self.task is not None and self.task.domain is not None and self.domain_sessions == "heads_only"

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """Session 1 trains for ``epochs`` (the slow learner), later sessions for ``later_epochs`` (none for
        later DIL domains with ``domain_sessions=heads_only``)."""
        if ctx.task.index == 0:
            epochs = self.epochs
        else:
            epochs = 0 if self.fast_learner_frozen else self.later_epochs
        return [Phase("train", epochs, ctx.train_set, self.batch_size)]

    def on_task_end(self, ctx: TaskContext) -> None:
        """Session 1: copy the slow learner and reset both ``sigma`` (``reset_sigma``). Every session: refit
        both ridge heads (fast first)."""
        if ctx.task.index == 0:
            self.slow_backbone = independent_copy(self.backbone, trainable=False)
            self.slow_cosine = independent_copy(self.cosine_head, trainable=False)  # type: ignore[assignment]
            if self.reset_sigma:  # setup_RP / setup_RP_branch: fc.reset_parameters() fills sigma with 10
                with torch.no_grad():
                    self.cosine_head.sigma.fill_(self.cosine_sigma)
                    self.slow_cosine.sigma.fill_(self.cosine_sigma)
        assert self.slow_backbone is not None and self.slow_cosine is not None
        fast, labels = self.extract_features(ctx, ctx.train_eval_set)
        # at the end of session 1 the slow learner is an exact copy: its features are the fast ones (and stay
        # so while the fast learner is frozen under DIL)
        if ctx.task.index == 0 or self.fast_learner_frozen:
            slow = fast
        else:
            slow, _ = self.extract_features(ctx, ctx.train_eval_set, self.slow_backbone)
        if self.imprint_slow_protos and ctx.task.index > 0:
            with torch.no_grad():
                for c in torch.unique(labels):
                    self.slow_cosine.weight[c] = slow[labels == c].mean(dim=0).to(self.slow_cosine.weight)
        generator = ctx.generator()
        self.head.fit(fast, labels, generator=generator)
        shared = self.head if self.ridge_stats == "shared" else None
        self.slow_head.fit(slow, labels, statistics=shared, generator=generator)

    def structure(self) -> dict[str, Any]:
        """Also: whether the slow learner exists (it is copied at the end of session 1)."""
        return {**super().structure(), "slow_learner": self.slow_backbone is not None}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        super().restore_structure(structure)
        if structure["slow_learner"]:
            self.slow_backbone = independent_copy(self.backbone, trainable=False)
            self.slow_cosine = independent_copy(self.cosine_head, trainable=False)  # type: ignore[assignment]

    # ----------------------------------------------------------------- training
    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The cosine period is session 1's epochs in every session (the code's ``T_max=tuned_epoch``)."""
        if self.scheduler_name == "none":
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))

    @torch.no_grad()
    def _pretrained_features(self, x: torch.Tensor) -> torch.Tensor:
        """The PTM's features: the backbone with PET off, in eval mode."""
        was_training = self.backbone.training
        self.backbone.eval()
        with peft_disabled(self.backbone):
            features = self.backbone(x)
        self.backbone.train(was_training)
        return features

    def cross_classification(self, fast: torch.Tensor, slow: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L_s2f + L_f2s``: each cosine head classifies the other learner's old prototypes and features."""
        assert self.task is not None and self.slow_cosine is not None
        known = self.task.known_classes
        targets = torch.cat([torch.arange(known, device=y.device), y])
        slow_to_fast = self.cosine_head(torch.cat([self.slow_cosine.weight[:known], slow]))
        fast_to_slow = self.slow_cosine(torch.cat([self.cosine_head.weight[:known], fast]))
        return F.cross_entropy(slow_to_fast, targets) + F.cross_entropy(fast_to_slow, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.task is not None
        x, y = batch
        features = self.backbone(x)
        loss = ce = F.cross_entropy(*self.task_logits(self.cosine_head(features), y))
        extra_needed = (
            self.diag_weight or self.redundancy_weight
            if self.task.index == 0
            else self.align_weight or self.cross_weight
        )
        if extra_needed:
            second = features if self.share_forward_pass else self.backbone(x)
            if self.task.index == 0:
                transfer = transfer_loss(
                    second, self._pretrained_features(x), self.diag_weight, self.redundancy_weight
                )
                loss = loss + transfer
                self.log("train/transfer", transfer, on_step=False, on_epoch=True, batch_size=len(y))
            else:
                assert self.slow_backbone is not None
                with torch.no_grad():
                    slow = self.slow_backbone(x)
                align = (1 - F.cosine_similarity(second, slow, dim=-1)).sum()
                cross = self.cross_classification(second, slow, y)
                loss = loss + self.align_weight * align + self.cross_weight * cross
                self.log("train/align", align, on_step=False, on_epoch=True, batch_size=len(y))
                self.log("train/cross", cross, on_step=False, on_epoch=True, batch_size=len(y))
        self.check_finite(loss, batch_idx)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    # ----------------------------------------------------------------- inference
    def learner_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z_fast, z_slow)``: ridge logits times cosine ``sigma`` (z_slow: None before session 1 ends)."""
        fast = self.cosine_head.sigma * self.head(self.backbone(x))
        if self.slow_backbone is None or self.slow_cosine is None:
            return fast, None
        return fast, self.slow_cosine.sigma * self.slow_head(self.slow_backbone(x))

    def combine(self, fast: torch.Tensor, slow: torch.Tensor | None) -> torch.Tensor:
        """The aggregate of the two learners (session 1, and every DIL domain with the fast learner frozen:
        the fast learner, as the code)."""
        fast_only = self.task is None or self.task.index == 0 or self.fast_learner_frozen
        if slow is None or (fast_only and self.aggregation != "slow"):
            return fast
        return aggregate(fast, slow, self.aggregation, self.gamma)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The aggregate of the two learners."""
        return self.combine(*self.learner_logits(x))

    def predict(self, x: torch.Tensor) -> Prediction:
        """The aggregate, with the fast and the slow learner alone as alternatives (reported beside it and
        never used to select it)."""
        fast, slow = self.learner_logits(x)
        alternatives = {"fast": fast} if slow is None else {"fast": fast, "slow": slow}
        return Prediction(self.combine(fast, slow), alternatives=alternatives)
