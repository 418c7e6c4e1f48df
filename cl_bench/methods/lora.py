"""Low-rank adaptation of linear layers (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
ICLR 2022, Sec. 4.1): ``y = x (W0 + scale * B A)^T + b`` with ``A`` of shape ``[rank, in]`` and ``B`` of
shape ``[out, rank]``; ``B = 0`` at initialisation, so a wrapped layer starts as the pre-trained one.

The factors are never merged into ``W0``: every forward pass builds the effective weight ``W0 + scale B A``
(cheap next to the matmul over the tokens) and ``W0`` keeps its pre-trained value, so the adaptation can be
read off, reset or frozen at any time. A wrapped layer is still an ``nn.Linear`` with the same ``weight``
and ``bias`` parameters (the same state-dict keys plus ``lora_A``/``lora_B``), so code that walks
``nn.Linear`` modules keeps working and a fused projection such as timm's ``attn.qkv`` (``3 * dim``
outputs) gets one low-rank update for q, k and v together, as SLCA++'s ``LoraAttention`` does.

``scale`` is the factor in front of ``B A``; PEFT/loralib's ``alpha / rank`` convention is
``scale = alpha / rank`` (SLCA++ uses ``scale = 0.8`` with ``rank = 4``, ``convs/vits.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import ConfigError

LORA_INITS = ("gaussian", "svd")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a trainable low-rank update ``scale * B @ A`` of its weight.

    Built from an existing layer with :meth:`wrap`, which shares that layer's ``weight`` and ``bias``
    parameters (no copy). ``A`` starts as a truncated normal with std 0.02 (SLCA++'s ``trunc_normal_``;
    ``init="svd"`` replaces it by the top-``rank`` right singular vectors of ``W0``, SLCA++'s
    ``init_lora``), ``B`` at zero.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, scale: float, bias: bool = True
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ConfigError(f"LoRA rank={rank} must be at least 1")
        self.rank = rank
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.trunc_normal_(self.lora_A, std=0.02)

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, scale: float, init: str = "gaussian") -> LoRALinear:
        """A LoRA layer around ``linear``'s own weight and bias (same device and dtype)."""
        if isinstance(linear, LoRALinear):
            raise ConfigError("this layer already carries LoRA factors; wrap each layer once")
        if init not in LORA_INITS:
            raise ConfigError(f"LoRA init={init!r}: choose one of {list(LORA_INITS)}")
        with torch.device("meta"):  # no throw-away allocation of a second weight
            layer = cls(linear.in_features, linear.out_features, rank, scale, bias=linear.bias is not None)
        layer.weight = linear.weight
        layer.bias = linear.bias
        ref = linear.weight
        layer.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=ref.device, dtype=ref.dtype))
        layer.lora_B = nn.Parameter(
            torch.zeros(linear.out_features, rank, device=ref.device, dtype=ref.dtype)
        )
        if init == "svd":
            layer.init_from_weight_svd()
        else:
            nn.init.trunc_normal_(layer.lora_A, std=0.02)
        return layer

    @torch.no_grad()
    def init_from_weight_svd(self) -> None:
        """``A <- Vh[:rank]``: the top right singular vectors of ``W0`` (SLCA++ ``init_lora``, task 0)."""
        _, _, vh = torch.linalg.svd(self.weight.float(), full_matrices=False)
        self.lora_A.copy_(vh[: self.rank].to(self.lora_A))

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``scale * B @ A`` (zero at initialisation)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.delta_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale}"


def add_lora(
    model: nn.Module, targets: Sequence[str], rank: int, scale: float, init: str = "gaussian"
) -> dict[str, LoRALinear]:
    """Replace every ``nn.Linear`` of ``model`` whose dotted name ends with one of ``targets`` (e.g.
    ``attn.qkv``, ``mlp.fc1``, ``mlp.fc2``) by a :class:`LoRALinear` around it; returns them by name.

    Parameters keep their ``requires_grad``; use :func:`mark_only_lora_trainable` to train the factors
    alone. Raises :class:`~cl_bench.errors.ConfigError` when a target matches no linear layer.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped: dict[str, LoRALinear] = {}
    for target in targets:
        matches = [(n, m) for n, m in linears if n == target or n.endswith(f".{target}")]
        if not matches:
            suffixes = sorted({".".join(n.split(".")[-2:]) for n, _ in linears})
            raise ConfigError(
                f"LoRA target {target!r} matches no nn.Linear of {type(model).__name__}; "
                f"linear layers end with: {', '.join(suffixes) or '(none)'}"
            )
        for name, linear in matches:
            wrapped[name] = LoRALinear.wrap(linear, rank, scale, init)
            model.set_submodule(name, wrapped[name])
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A``/``lora_B`` factors of every :class:`LoRALinear` in ``model``."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the LoRA factors."""
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
