"""Any timm model as a backbone (``timm.create_model(name, num_classes=0)``)."""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.backbones.checkpoint import load_strict, read_state_dict
from cl_bench.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def _classifier_prefixes(pretrained_cfg: dict) -> tuple[str, ...]:
    names = pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


class TimmBackbone(Backbone):
    """A timm model without its classifier; the embedding is timm's pre-logits output.

    Args:
        name: timm model name with its pretrained tag, e.g. ``vit_base_patch16_224.augreg_in21k``.
        pretrained: fetch timm's weights for ``name`` (needs network or a filled Hugging Face cache).
        checkpoint: a local file (``.safetensors``, ``.pth``...) in timm's key layout or one that the
            model's own ``checkpoint_filter_fn`` converts (original ViT/torchvision layouts); loaded strictly,
            the source classifier dropped. Takes precedence over ``pretrained``.
        drop_path_rate: stochastic depth rate.
        model_kwargs: further ``timm.create_model`` arguments, e.g. ``{img_size: 32, patch_size: 4}`` for a
            ViT on CIFAR-sized images.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint: str | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"backbone.name={name!r} is not a timm model; see timm.list_models()")
        kwargs = {**(model_kwargs or {}), "num_classes": 0}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        use_hub = pretrained and not checkpoint
        try:
            self.model = timm.create_model(name, pretrained=use_hub, **kwargs)
        except Exception as exc:
            if not use_hub:
                raise
            raise CheckpointError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "On a machine "
                f"with network, save them (python -c \"import timm,torch; m=timm.create_model('{name}', "
                "pretrained=True); torch.save(m.state_dict(), 'w.pth')\") and pass "
                "backbone.checkpoint=/path/to/w.pth, or set backbone.pretrained=false for random weights."
            ) from exc
        if checkpoint:
            state = read_state_dict(checkpoint)
            filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
            if filter_fn is not None:
                try:
                    state = filter_fn(state, self.model)
                except Exception as exc:
                    raise CheckpointError(
                        f"{checkpoint}: timm could not convert its keys for {name}: {exc}"
                    ) from exc
            prefixes = _classifier_prefixes(self.model.pretrained_cfg)
            load_strict(self.model, state, checkpoint, drop_prefixes=prefixes)
            log.info("%s: loaded %s", name, checkpoint)
        elif not pretrained:
            log.warning("%s: pretrained=false and no checkpoint, weights are randomly initialised", name)
        dc = timm.data.resolve_model_data_config(self.model)
        self.name = name
        self.feat_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        img_size = (model_kwargs or {}).get("img_size")
        self.data_config = DataConfig(
            # timm's pretrained_cfg describes the tag's resolution; an explicit img_size (a ViT built for
            # 32 px CIFAR images) replaces it, and its eval transform then takes the image as it is.
            input_size=int(img_size if img_size is not None else dc["input_size"][-1]),
            mean=tuple(float(v) for v in dc["mean"]),
            std=tuple(float(v) for v in dc["std"]),
            interpolation=str(dc.get("interpolation", "bilinear")),
            crop_pct=1.0 if img_size is not None else float(dc.get("crop_pct", 1.0)),
        )

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks (ViT/DeiT ``blocks``), else the blocks of ResNet-style stages."""
        if hasattr(self.model, "blocks"):
            return list(self.model.blocks)
        stages = [getattr(self.model, f"layer{i}") for i in range(1, 5) if hasattr(self.model, f"layer{i}")]
        if not stages and hasattr(self.model, "stages"):
            stages = [getattr(stage, "blocks", stage) for stage in self.model.stages]
        if not stages:
            raise NotImplementedError(f"{self.name}: no blocks/layerN/stages attribute to list blocks from")
        return [block for stage in stages for block in stage]

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=True)
