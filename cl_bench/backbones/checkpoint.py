"""Reading local checkpoint files and loading them with strict key checking."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from cl_bench.errors import CheckpointError

#: Wrapper keys under which training scripts nest the weights.
NESTED_KEYS = ("state_dict", "model", "model_state", "module", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``.safetensors`` or a torch pickle (``.pth/.pt/.th/.bin``) into a flat ``{name: tensor}``.

    Unwraps ``{"state_dict": ...}``-style nesting and strips DataParallel's ``module.`` prefixes.
    Torch pickles are read with ``weights_only=True`` (no code execution) onto the CPU.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}; pass backbone.checkpoint=/path/to/weights")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc}") from exc
    for _ in range(3):  # unwrap nested containers
        if not isinstance(state, Mapping):
            break
        inner = next((state[k] for k in NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{file} holds no state dict of tensors (top-level type {type(state).__name__})"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, drop_prefixes: Iterable[str] = ()
) -> list[str]:
    """Load ``state`` into ``module`` with every key and shape matching.

    Keys under ``drop_prefixes`` (the source model's classifier, which a feature extractor lacks) are
    removed first and returned; any other missing, unexpected or mis-shaped key is an error (BatchNorm's
    ``num_batches_tracked`` counter excepted: old checkpoints lack it).
    """
    prefixes = tuple(drop_prefixes)
    dropped = [k for k in state if prefixes and k.startswith(prefixes)]
    kept = {k: v for k, v in state.items() if k not in dropped}
    own = module.state_dict()
    # BN's batch counter is absent from pre-0.4.1 checkpoints; BatchNorm fills it in itself.
    missing = sorted(k for k in set(own) - set(kept) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(kept) - set(own))
    mismatched = [
        f"{k}: {tuple(kept[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in kept and kept[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:5]})")
        if mismatched:
            parts.append(f"shape mismatches {mismatched[:5]}")
        raise CheckpointError(
            f"checkpoint {source} does not match {type(module).__name__}: {'; '.join(parts)}. "
            "Check that backbone.* names the architecture the checkpoint was trained with."
        )
    module.load_state_dict(kept, strict=True)
    return dropped
