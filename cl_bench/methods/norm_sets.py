"""Per-task sets of LayerNorm affine parameters, swapped into a backbone's norm layers.

LayerNorm tuning (De Min et al., "On the Effectiveness of LayerNorm Tuning for Continual Learning in Vision
Transformers", ICCV-W 2023, arXiv 2308.09610; spec ``shared/research/methods_vit.md`` §4.2) keeps the backbone
frozen and learns, per task, a scale ``gamma_t`` and bias ``beta_t`` for every LayerNorm:
``LN_t(x) = normalise(x) * gamma_t + beta_t``. :class:`NormSets` wraps every ``nn.LayerNorm`` that
:meth:`~cl_bench.backbones.base.Backbone.norm_layers` lists (for a timm ViT: each block's ``norm1``/``norm2``
and the final ``norm``) in a :class:`TaskLayerNorm` and decides which affine set they apply:

* ``None``: the pre-trained affine parameters (the frozen model, e.g. the query pass of task keys);
* an ``int`` ``t``: set ``t`` for the whole batch (training, or inference with a known task);
* a ``LongTensor`` ``[B]``: set ``tasks[i]`` for image ``i``, one batched pass for a mixed batch;
* :data:`PER_LAYER`: each layer picks, per image, the set whose keys
  (:class:`~cl_bench.methods.task_keys.AttendedKeys`) match the first token of its own input best (the
  single-stage variant, §4.3-4.4; needs :meth:`NormSets.add_selectors`).

With selectors, a pass with one set ``t`` also records, per layer, ``mean_b cos(a_t * x_b[0], k_t)`` on the
layer's input (:meth:`NormSets.mean_match`, the single-stage training term).

Every set is its own pair of tensors per layer (``nn.ParameterList``), never a view of another: the official
code builds its ``T x D`` tables with ``nn.Parameter(w.unsqueeze(0).expand(T, -1))``, whose rows alias one
vector until a device move happens to copy them (§4.8 pitfall 1). Older sets are frozen
(``requires_grad=False``) when a new one is added, so no optimiser (weight decay, AdamW, carried state) can
move them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.task_keys import AttendedKeys

#: Each layer selects its own set from its input (module docstring).
PER_LAYER = "per_layer"
Selection = int | torch.Tensor | str | None


def first_token(x: torch.Tensor) -> torch.Tensor:
    """The query of a layer's input: the first token of ``[B, N, D]`` tokens (timm ViT: [CLS]), or ``x``."""
    return x[:, 0] if x.dim() == 3 else x


class TaskLayerNorm(nn.Module):
    """A LayerNorm with the pre-trained affine parameters plus one trainable affine set per task.

    ``pretrained`` is the original ``nn.LayerNorm`` (frozen, kept as a submodule so its weights stay in the
    state dict); normalisation uses its ``normalized_shape`` and ``eps``.
    """

    def __init__(self, layer: nn.LayerNorm) -> None:
        super().__init__()
        if not layer.elementwise_affine or layer.weight is None or layer.bias is None:
            raise ConfigError(
                "LayerNorm tuning needs LayerNorms with a scale and a bias (elementwise_affine)"
            )
        self.pretrained = layer.requires_grad_(False)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        #: Which affine parameters the next forward pass applies (module docstring).
        self.selection: Selection = None
        #: The layer's own keys (single-stage variant; :meth:`NormSets.add_selectors`).
        self.selector: AttendedKeys | None = None
        #: The match of the last one-set pass with a selector (:meth:`NormSets.mean_match`).
        self.match: torch.Tensor | None = None

    @property
    def num_sets(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def add_set(self, copy_from: int | None) -> None:
        """Append a trainable set initialised from set ``copy_from`` (``None``: the pre-trained parameters);
        every older set is frozen."""
        source = self.pretrained if copy_from is None else None
        weight = source.weight if source is not None else self.weights[copy_from]
        bias = source.bias if source is not None else self.biases[copy_from]
        for param in [*self.weights, *self.biases]:
            param.requires_grad_(False)
        self.weights.append(nn.Parameter(weight.detach().clone()))
        self.biases.append(nn.Parameter(bias.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        selection = self.selection
        if selection is None:
            return self.pretrained(x)
        shape, eps = self.pretrained.normalized_shape, self.pretrained.eps
        if isinstance(selection, str):
            if self.selector is None:
                raise RuntimeError("per-layer selection needs the layers' selectors (NormSets.add_selectors)")
            selection = self.selector.select(first_token(x))
        elif isinstance(selection, int) and self.selector is not None:
            self.match = self.selector.match(first_token(x), selection)
        if isinstance(selection, int):
            return F.layer_norm(x, shape, self.weights[selection], self.biases[selection], eps)
        if selection.shape != (x.shape[0],):
            raise ValueError(
                f"per-image sets need a [{x.shape[0]}] task tensor, got {tuple(selection.shape)}"
            )
        # One affine set per image, broadcast over the token (and any other) dimensions.
        view = (x.shape[0],) + (1,) * (x.dim() - 1 - len(shape)) + tuple(shape)
        weight = torch.stack(tuple(self.weights))[selection].view(view)
        bias = torch.stack(tuple(self.biases))[selection].view(view)
        return F.layer_norm(x, shape, None, None, eps) * weight + bias

    def extra_repr(self) -> str:
        return f"{tuple(self.pretrained.normalized_shape)}, sets={self.num_sets}"


class NormSets:
    """Wraps every ``nn.LayerNorm`` of ``backbone`` in a :class:`TaskLayerNorm` (in place) and manages their
    per-task affine sets together.

    The wrapped layers are submodules of the backbone, so their parameters belong to whoever owns the
    backbone; this object only keeps references to them. Which LayerNorms are wrapped: every one in
    ``backbone.norm_layers()`` (timm ViT: 2 per block and the final norm, 25 for ViT-B/16, §4.2).
    """

    def __init__(self, backbone: Backbone) -> None:
        if any(isinstance(module, TaskLayerNorm) for module in backbone.modules()):
            raise ValueError("this backbone's LayerNorms are already wrapped by another NormSets")
        names = [name for name, module in backbone.norm_layers() if isinstance(module, nn.LayerNorm)]
        if not names:
            raise ConfigError(
                f"{type(backbone).__name__} has no nn.LayerNorm layers: LayerNorm tuning needs a transformer "
                "backbone (e.g. backbone=vit_b16_in21k_ft_in1k)"
            )
        self.names = names
        self.layers: list[TaskLayerNorm] = []
        for name in names:
            layer = TaskLayerNorm(backbone.get_submodule(name))
            backbone.replace(name, layer)
            self.layers.append(layer)

    @property
    def num_sets(self) -> int:
        return self.layers[0].num_sets

    @property
    def params_per_set(self) -> int:
        """Trainable scalars of one set: ``2 * D`` per wrapped LayerNorm (38,400 for ViT-B/16, §4.2)."""
        return sum(2 * layer.pretrained.weight.numel() for layer in self.layers)

    def add_set(self, copy_from: int | None) -> int:
        """Add a set to every layer, initialised from set ``copy_from`` (``None``: pre-trained); returns its
        index. Older sets are frozen."""
        if copy_from is not None and not 0 <= copy_from < self.num_sets:
            raise IndexError(f"no set {copy_from} to copy from ({self.num_sets} sets)")
        for layer in self.layers:
            layer.add_set(copy_from)
        return self.num_sets - 1

    def add_selectors(self, num_tasks: int, init: str) -> None:
        """Give every layer its own :class:`~cl_bench.methods.task_keys.AttendedKeys` for ``num_tasks``
        tasks (a submodule of the layer, so of the backbone)."""
        for layer in self.layers:
            layer.selector = AttendedKeys(layer.pretrained.weight.numel(), num_tasks, init)

    def add_selector_keys(self, copy_previous: bool) -> None:
        """Every layer's next task key and attention vector (the older ones are frozen)."""
        for layer in self.layers:
            assert layer.selector is not None, "add_selectors() first"
            layer.selector.add_key(copy_previous)

    def selector_parameters(self, index: int) -> list[nn.Parameter]:
        """Every layer's key and attention vector of task ``index``."""
        return [p for layer in self.layers if layer.selector for p in layer.selector.parameters_of(index)]

    def mean_match(self) -> torch.Tensor:
        """The single-stage similarity term ``S`` of the last one-set pass, and forget it: the layers' matches
        averaged within each parent module (a ViT block's ``norm1`` and ``norm2``), then over the parents
        (12 blocks and the final norm: 13 terms, official ``forward_features_single_stage``)."""
        groups: dict[str, list[torch.Tensor]] = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            if layer.match is None:
                raise RuntimeError(f"LayerNorm {name} recorded no match: run a one-set pass with selectors")
            groups.setdefault(name.rpartition(".")[0], []).append(layer.match)
            layer.match = None
        return torch.stack([torch.stack(matches).mean() for matches in groups.values()]).mean()

    def parameters_of(self, index: int) -> list[nn.Parameter]:
        """Set ``index``'s scales then biases, in layer order."""
        return [layer.weights[index] for layer in self.layers] + [
            layer.biases[index] for layer in self.layers
        ]

    def select(self, selection: Selection) -> None:
        """Make every wrapped layer apply ``selection`` (module docstring) from now on."""
        if isinstance(selection, str) and selection != PER_LAYER:
            raise ValueError(f"selection {selection!r}: the only named selection is {PER_LAYER!r}")
        if isinstance(selection, int) and not 0 <= selection < self.num_sets:
            raise IndexError(f"no set {selection} ({self.num_sets} sets)")
        if torch.is_tensor(selection):
            if selection.dtype != torch.long or selection.dim() != 1:
                raise ValueError("a per-image selection is a 1-D LongTensor of set indices")
            if len(selection) and bool((selection < 0).any() | (selection >= self.num_sets).any()):
                raise IndexError(f"per-image selection outside [0, {self.num_sets})")
            if len(selection) and bool((selection == selection[0]).all()):
                selection = int(selection[0])  # one set for the whole batch: the fused LayerNorm
        for layer in self.layers:
            layer.selection = selection

    @contextlib.contextmanager
    def selected(self, selection: Selection) -> Iterator[None]:
        """``with sets.selected(t): ...`` applies ``selection`` in the block, then restores the old one."""
        previous = self.layers[0].selection
        self.select(selection)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.selection = previous
