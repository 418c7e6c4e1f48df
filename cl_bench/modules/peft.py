"""Parameter-efficient tuning (PET) modules for timm ViTs: AdaptFormer adapters, SSF, deep and shallow VPT.

Each module wraps a submodule of a :class:`~cl_bench.backbones.base.Backbone` in place (``Backbone.replace``),
at the insertion points of the PET code that RanPAC, APER/ADAM and SAFE share (``petl/`` of
``RanPAC/RanPAC``, ``zhoudw-zdw/RevisitingCIL`` and ``MIFA-Lab/SAFE``; ``shared/research/methods_vit.md``
§3.2 and §5):

* ``adapter``: AdaptFormer (Chen et al., NeurIPS 2022) in its ``parallel`` form, one per block, beside the
  MLP: ``x <- x + MLP(LN2(x)) + s * Up(Dropout(ReLU(Down(x))))``, bottleneck 64, ``s = 0.1``, dropout 0.1, no
  adapter LayerNorm; ``Down`` Kaiming-uniform, ``Up`` and both biases zero (``ffn_adapter_init_option=lora``),
  so the adapted model equals the pre-trained one at init.
* ``ssf``: SSF (Lian et al., NeurIPS 2022), a per-channel ``y * scale + shift`` after the patch embedding,
  after ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` of every block and after
  the final norm; ``scale ~ N(1, 0.02)``, ``shift ~ N(0, 0.02)`` (SSF's ``init_ssf_scale_shift``).
* ``vpt``: deep VPT (Jia et al., ECCV 2022) as in the ``sagizty/VPT`` code those repositories use: before
  every block, ``prompt_tokens`` (5) learnable tokens are appended to the sequence and their outputs dropped
  after the block; prompts are zero-initialised (``Prompt_Tokens = nn.Parameter(torch.zeros(...))``).
* ``vpt_shallow``: shallow VPT, the same code's ``VPT_type="Shallow"`` (RevisitingCIL ``vpt_type: shallow``):
  ``prompt_tokens`` zero-initialised tokens are appended once, after the position embedding, pass through
  every block, and are dropped after the last block (before the final norm).

Every wrapper can be switched off (:func:`peft_disabled`), which gives back the pre-trained model exactly:
APER's and SAFE's "PTM" features come from the same backbone with its PET modules off, so no second copy of
the frozen weights is needed. :func:`peft_parameters` lists only the PET parameters;
:func:`independent_copy` makes a deep copy (SAFE's slow learner next to its fast one). Sizes are
configuration, so the same modules fit ViT-B/16 (768-d) and the small 192-d ViTs of the tests.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError

PEFT_KINDS = ("adapter", "ssf", "vpt", "vpt_shallow", "none")


class PetModule(nn.Module):
    """A wrapper that adds PET parameters to one submodule; ``enabled = False`` makes it a pass-through."""

    enabled: bool = True

    def pet_parameters(self) -> list[nn.Parameter]:
        """The PET parameters this wrapper adds (never the wrapped module's own)."""
        raise NotImplementedError


class AdapterBranch(nn.Module):
    """AdaptFormer's bottleneck branch ``scale * Up(Dropout(ReLU(Down(x))))``: ``Down`` Kaiming-uniform,
    ``Up`` and both biases zero (``ffn_adapter_init_option=lora``), so the branch outputs zero at init.
    :class:`ParallelAdapter` adds it beside a block's MLP; EASE keeps one per task (``methods/ease.py``)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(x))))


class ParallelAdapter(AdapterBranch, PetModule):
    """AdaptFormer's parallel adapter around a ViT block's MLP: ``MLP(norm(x)) + scale * adapter(x)``.

    The block's ``norm2`` moves inside this module (the block's own ``norm2`` becomes the identity) because
    the adapter reads the block's residual stream *before* the LayerNorm, as in AdaptFormer. With the
    block's drop-path at 0 (the official setting) this equals AdaptFormer's block exactly. The branch's
    layers are this module's own (``down``/``up``), the keys saved models have.
    """

    def __init__(
        self, norm: nn.Module, mlp: nn.Module, dim: int, bottleneck: int, scale: float, dropout: float
    ):
        super().__init__(dim, bottleneck, scale, dropout)
        self.norm = norm
        self.mlp = mlp

    def pet_parameters(self) -> list[nn.Parameter]:
        return [*self.down.parameters(), *self.up.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm(x))
        if self.enabled:
            out = out + super().forward(x)
        return out


class ScaleShift(PetModule):
    """SSF: ``inner(x) * scale + shift`` over the last (channel) dimension."""

    def __init__(self, inner: nn.Module, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.inner = inner
        self.ssf_scale = nn.Parameter(torch.empty(dim).normal_(1.0, init_std))
        self.ssf_shift = nn.Parameter(torch.empty(dim).normal_(0.0, init_std))

    def pet_parameters(self) -> list[nn.Parameter]:
        return [self.ssf_scale, self.ssf_shift]

    def forward(self, *args: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        return out * self.ssf_scale + self.ssf_shift if self.enabled else out


class PromptedBlock(PetModule):
    """Deep VPT for one block: ``block(cat(x, prompts))`` with the prompts' outputs dropped afterwards."""

    def __init__(self, block: nn.Module, dim: int, tokens: int) -> None:
        super().__init__()
        self.block = block
        self.prompts = nn.Parameter(torch.zeros(tokens, dim))

    def pet_parameters(self) -> list[nn.Parameter]:
        return [self.prompts]

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.block(x, **kwargs)
        n = self.prompts.shape[0]
        prompted = torch.cat([x, self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return self.block(prompted, **kwargs)[:, :-n]


class ShallowPromptedBlocks(nn.Sequential, PetModule):
    """Shallow VPT around a ViT's blocks: ``blocks(cat(x, prompts))`` with the prompts' outputs dropped after
    the last block. Still the ``nn.Sequential`` of the same blocks (same indices, iteration and length)."""

    def __init__(self, blocks: list[nn.Module], dim: int, tokens: int) -> None:
        super().__init__(*blocks)
        self.prompts = nn.Parameter(torch.zeros(tokens, dim))

    def pet_parameters(self) -> list[nn.Parameter]:
        return [self.prompts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(x)
        n = self.prompts.shape[0]
        prompted = torch.cat([x, self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return super().forward(prompted)[:, :-n]


def _vit_parts(backbone: Backbone) -> tuple[nn.Module, list[nn.Module], int]:
    """The timm ViT inside ``backbone``, its blocks and its width; a clear error for anything else."""
    model = getattr(backbone, "model", None)
    blocks = backbone.blocks() if model is not None else []
    if model is None or not hasattr(model, "patch_embed") or not blocks:
        raise ConfigError(
            f"PET modules (adapter/ssf/vpt/vpt_shallow) need a timm ViT backbone; "
            f"{type(backbone).__name__} is not one. Use backbone=vit_b16_in21k (or another timm vit_*), or "
            "method.peft=none"
        )
    for block in blocks:
        if not all(hasattr(block, a) for a in ("norm1", "norm2", "mlp", "attn")):
            raise ConfigError(f"{type(block).__name__} is not a timm ViT Block (norm1/attn/norm2/mlp)")
    return model, blocks, int(model.embed_dim)


def attach_peft(
    backbone: Backbone,
    kind: str,
    adapter_bottleneck: int = 64,
    adapter_scale: float = 0.1,
    adapter_dropout: float = 0.1,
    prompt_tokens: int = 5,
) -> list[PetModule]:
    """Wrap ``backbone``'s submodules with ``kind`` PET modules (``none``: nothing); returns the wrappers.

    The defaults are the official code's (module docstring). The backbone keeps all its own parameters
    (frozen or not is the caller's choice, see :func:`freeze_all_but_peft`).
    """
    if kind not in PEFT_KINDS:
        raise ConfigError(f"method.peft={kind!r}: choose one of {list(PEFT_KINDS)}")
    if kind == "none":
        return []
    if adapter_bottleneck < 1 or prompt_tokens < 1 or not 0.0 <= adapter_dropout < 1.0:
        raise ConfigError(
            "method.adapter_bottleneck and method.prompt_tokens must be >= 1; adapter_dropout in [0, 1)"
        )
    model, blocks, dim = _vit_parts(backbone)
    wrappers: list[PetModule] = []
    if kind == "adapter":
        for block in blocks:
            wrapper = ParallelAdapter(
                block.norm2, block.mlp, dim, adapter_bottleneck, adapter_scale, adapter_dropout
            )
            block.norm2 = nn.Identity()
            block.mlp = wrapper
            wrappers.append(wrapper)
    elif kind == "ssf":
        targets: list[tuple[nn.Module, str, int]] = [(model, "patch_embed", dim)]
        for block in blocks:
            targets += [(block, "norm1", dim), (block.attn, "qkv", 3 * dim), (block.attn, "proj", dim)]
            targets += [(block, "norm2", dim), (block.mlp, "fc1", block.mlp.fc1.out_features)]
            targets += [(block.mlp, "fc2", dim)]
        targets.append((model, "norm", dim))
        for parent, name, width in targets:
            wrapper = ScaleShift(getattr(parent, name), width)
            setattr(parent, name, wrapper)
            wrappers.append(wrapper)
    elif kind == "vpt":
        wrapped = [PromptedBlock(block, dim, prompt_tokens) for block in blocks]
        model.blocks = nn.Sequential(*wrapped)
        wrappers.extend(wrapped)
    else:
        model.blocks = ShallowPromptedBlocks(blocks, dim, prompt_tokens)
        wrappers.append(model.blocks)
    for wrapper in wrappers:
        wrapper.train(backbone.training)  # new modules follow the backbone's train/eval mode
    return wrappers


def pet_modules(module: nn.Module) -> list[PetModule]:
    """Every PET wrapper inside ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, PetModule)]


def peft_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Only the PET parameters inside ``module`` (what SAFE/RanPAC/APER train on the first session)."""
    return [p for wrapper in pet_modules(module) for p in wrapper.pet_parameters()]


def freeze_all_but_peft(module: nn.Module) -> None:
    """``requires_grad`` off for every parameter of ``module`` except its PET parameters."""
    module.requires_grad_(False)
    for p in peft_parameters(module):
        p.requires_grad_(True)


@contextlib.contextmanager
def peft_disabled(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module`` computes the pre-trained model's output (PET wrappers pass through)."""
    wrappers = pet_modules(module)
    states = [w.enabled for w in wrappers]
    for wrapper in wrappers:
        wrapper.enabled = False
    try:
        yield
    finally:
        for wrapper, state in zip(wrappers, states, strict=True):
            wrapper.enabled = state


def independent_copy(module: nn.Module, trainable: bool) -> nn.Module:
    """A deep copy sharing no tensor with ``module``; ``trainable=False`` freezes it and sets eval mode."""
    clone = copy.deepcopy(module)
    if not trainable:
        clone.requires_grad_(False)
        clone.eval()
    return clone
