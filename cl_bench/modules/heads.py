"""Classifier heads that grow with the tasks; logits are ordered by class-order position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.modules.precision import float32


class IncrementalLinearHead(nn.Module):
    """One ``nn.Linear`` block per task, concatenated: task t's block scores its own classes.

    Keeping blocks separate lets a method freeze or re-initialise one task's classifier (e.g. SLCA's frozen
    old heads) without masking a shared weight matrix.
    """

    def __init__(self, in_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.bias = bias
        self.blocks = nn.ModuleList()

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def task_sizes(self) -> list[int]:
        """Classes per task block, in order."""
        return [block.out_features for block in self.blocks]

    def add_task(self, n_classes: int) -> nn.Linear:
        """Append a block for ``n_classes`` new classes on the device of the existing ones."""
        block = nn.Linear(self.in_features, n_classes, bias=self.bias)
        if len(self.blocks):
            block.to(self.blocks[0].weight.device)
        self.blocks.append(block)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """Grow to the saved number of blocks (with their sizes) before copying."""
        while prefix + f"blocks.{len(self.blocks)}.weight" in state_dict:
            weight = state_dict[prefix + f"blocks.{len(self.blocks)}.weight"]
            block = nn.Linear(self.in_features, weight.shape[0], bias=self.bias)
            self.blocks.append(block.to(weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PrototypeHead(nn.Module):
    """Cosine classifier over class prototypes: ``logit_c = scale * cos(f, mu_c)``.

    Used by SimpleCIL (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models",
    Sec. 4: the prototype classifier with frozen PTM features). ``scale`` does not change the argmax.
    """

    def __init__(self, in_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.scale = scale
        self.register_buffer("prototypes", torch.zeros(0, in_features))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def add_task(self, n_classes: int) -> None:
        """Reserve ``n_classes`` prototypes (zero until :meth:`set_prototypes` fills them)."""
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(n_classes, self.in_features)])

    def set_prototypes(self, class_positions: torch.Tensor, prototypes: torch.Tensor) -> None:
        """Store ``prototypes[i]`` as the prototype of class position ``class_positions[i]``."""
        low, high = int(class_positions.min()), int(class_positions.max())
        if low < 0 or high >= self.num_classes:
            raise IndexError(f"class positions must lie in [0, {self.num_classes}), got [{low}, {high}]")
        self.prototypes[class_positions.to(self.prototypes.device)] = prototypes.to(self.prototypes)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, accumulate: bool = False) -> None:
        """Prototypes from one task's embeddings ``features`` of class positions ``labels``: each class's
        mean embedding; with ``accumulate``, each class's *sum* is added to its stored prototype instead, for
        tasks that revisit classes (``scenario=dil``): the cosine then compares with the mean over every
        image of the class seen so far, as RanPAC's and SAFE's DIL ``replace_fc`` does
        (``fc.weight[c] += sum``, "for dil, we update all classes in all tasks")."""
        classes = torch.unique(labels)
        stats = [features[labels == c] for c in classes]
        if accumulate:
            sums = torch.stack([f.sum(dim=0) for f in stats]).to(self.prototypes)
            self.set_prototypes(classes, self.prototypes[classes.to(self.prototypes.device)] + sums)
        else:
            self.set_prototypes(classes, torch.stack([f.mean(dim=0) for f in stats]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scores in float32 whatever the autocast (:mod:`cl_bench.modules.precision`)."""
        with float32(x.device):
            return self.scale * F.normalize(x.float(), dim=1) @ F.normalize(self.prototypes.float(), dim=1).T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "prototypes"
        if key in state_dict:  # resize to the saved number of classes before copying
            self.prototypes = self.prototypes.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
