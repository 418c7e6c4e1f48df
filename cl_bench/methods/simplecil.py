"""SimpleCIL (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", arXiv 2303.07338, Sec. 4).

The pre-trained model is frozen and never trained. After each task, every new class's prototype is the
mean embedding of its training images under the test transform; prediction is
``argmax_c cos(f(x), mu_c)`` (a cosine classifier whose weights are the prototypes). No hyperparameters
beyond the backbone.

Domain-incremental scenarios (``scenario=dil``, not in the paper): a class's prototype is the mean over every
image of it in the domains seen so far (its feature sum is accumulated), as the NCM of RanPAC's and SAFE's
DIL branch (``replace_fc``: ``fc.weight[c] += sum``).
"""

from __future__ import annotations

from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import Capabilities, ContinualModule, Phase, TaskContext
from cl_bench.modules.heads import PrototypeHead


class SimpleCIL(ContinualModule):
    """Frozen backbone + class-mean prototypes with a cosine classifier; no gradient training."""

    CAPABILITIES = Capabilities(frozen_backbone=True, domain_incremental=True)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone, epochs=0)

    def build_head(self) -> nn.Module:
        return PrototypeHead(self.backbone.feat_dim)

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """No training phase: prototypes are set when the task ends."""
        return []

    def on_task_end(self, ctx: TaskContext) -> None:
        """Set each new class's prototype to the mean embedding of its training images (DIL: add the
        domain's images to the running mean)."""
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        self.head.fit(features, labels, accumulate=ctx.scenario.domain_incremental)
