"""Which backbones and scenarios a method can run on.

A method declares the backbone traits it cannot run without (``ContinualModule.backbone_needs``, narrowed
by its settings in ``ContinualModule.needs``); a backbone has the traits its module structure shows
(:func:`traits_of`). :func:`check_method_fits_backbone` compares the two before any data is loaded, from the
backbone's architecture built without weights on PyTorch's meta device: a single run stops with
:class:`UnsupportedBackboneError`, a sweep records the job as skipped (:mod:`cl_bench.sweeps`).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cl_bench.errors import ConfigError

#: Every trait a method may need, with what it means.
BACKBONE_TRAITS: dict[str, str] = {
    "conv_batchnorm": "convolutions followed by BatchNorm layers (a CNN such as a ResNet)",
    "layernorm": "LayerNorm layers with a scale and a bias (a transformer)",
    "vit_blocks": "timm ViT blocks (patch embedding; norm1/attn/norm2/mlp) for adapters, SSF, prompts, LoRA",
}


class UnsupportedBackboneError(ConfigError):
    """The method needs a backbone trait that the chosen backbone lacks."""


class UnsupportedScenarioError(ConfigError):
    """The method cannot learn the chosen scenario (a method without ``domain_incremental`` under DIL)."""


def traits_of(backbone: Any) -> frozenset[str]:
    """The traits (:data:`BACKBONE_TRAITS`) that ``backbone``'s modules show."""
    from torch import nn

    modules = list(backbone.modules())
    traits = set()
    if any(isinstance(m, nn.Conv2d) for m in modules) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules
    ):
        traits.add("conv_batchnorm")
    if any(isinstance(m, nn.LayerNorm) and m.elementwise_affine for m in modules):
        traits.add("layernorm")
    model = getattr(backbone, "model", None)
    blocks = list(getattr(model, "blocks", None) or [])
    if hasattr(model, "patch_embed") and blocks:
        if all(all(hasattr(b, a) for a in ("norm1", "attn", "norm2", "mlp")) for b in blocks):
            traits.add("vit_blocks")
    return frozenset(traits)


@functools.lru_cache(maxsize=64)
def _traits_from_json(target: str, kwargs_json: str) -> frozenset[str] | None:
    import torch
    from hydra.utils import get_object

    fn = get_object(target)
    kwargs = json.loads(kwargs_json)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "randomly initialised" warnings of the weightless build
    try:
        with torch.device("meta"):
            return traits_of(fn(**kwargs))
    except Exception:  # a backbone that cannot be built without its files: the run itself will tell
        return None
    finally:
        logging.disable(previous)


def backbone_traits(section: DictConfig) -> frozenset[str] | None:
    """Traits of the backbone a ``backbone`` config describes (its architecture, no weights, no download);
    ``None`` where it cannot be built that way."""
    from cl_bench.config import resolve_target, target_kwargs, target_parameters

    fn = resolve_target("backbone", section)
    params, _, _ = target_parameters(fn)
    kwargs = target_kwargs(fn, section)
    kwargs.update({k: v for k, v in (("checkpoint", None), ("pretrained", False)) if k in params})
    return _traits_from_json(section._target_, json.dumps(kwargs, sort_keys=True, default=str))


def check_method_fits_backbone(cfg: DictConfig, method_cls: type, settings: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedBackboneError` if the method, with these settings, needs a trait the backbone
    lacks (nothing is checked for a backbone that cannot be built on the meta device)."""
    needs = getattr(method_cls, "needs", None)
    required = frozenset(needs(settings)) if needs is not None else frozenset()
    if not required:
        return
    traits = backbone_traits(cfg.backbone)
    if traits is None or required <= traits:
        return
    missing = sorted(required - traits)
    method = cfg.method.get("name", method_cls.__name__)
    backbone = cfg.backbone.get("name", cfg.backbone._target_)
    setting = getattr(method_cls, "any_backbone_setting", None)
    alternative = f", set method.{setting} (runs on any backbone)" if setting else ""
    raise UnsupportedBackboneError(
        f"method={method} cannot run on the backbone {backbone}: it needs "
        + "; ".join(BACKBONE_TRAITS[t] for t in missing)
        + f". Choose another backbone (or protocol){alternative}, or leave this method out of the sweep."
    )


def method_settings(section: DictConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The method's keyword arguments: its signature's defaults updated with the config's values."""
    values = OmegaConf.to_container(section, resolve=True)
    assert isinstance(values, dict)
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    return {**defaults, **{k: v for k, v in values.items() if k not in ("_target_", "name")}}


def check_method_fits_scenario(cfg: DictConfig, method_cls: type) -> None:
    """Raise :class:`UnsupportedScenarioError` under ``scenario=dil`` for a method whose class-level
    ``CAPABILITIES`` do not declare ``domain_incremental``: such methods grow their head, restrict losses or
    distil per task of new classes, or train one merged task, which is wrong when every task holds all
    classes."""
    if str(cfg.scenario.type) != "dil":
        return
    capabilities = getattr(method_cls, "CAPABILITIES", None)
    if capabilities is not None and capabilities.domain_incremental:
        return
    method = cfg.method.get("name", method_cls.__name__)
    raise UnsupportedScenarioError(
        f"method={method} cannot run scenario=dil: it does not declare Capabilities.domain_incremental (it "
        "assumes each task brings new classes: a growing head, per-task losses, distillation or replay of "
        f"old tasks' classes, or one merged task). Choose a method that does ({', '.join(dil_methods())}), "
        "or scenario=cil."
    )


def dil_methods() -> list[str]:
    """The shipped methods (``conf/method/*.yaml``) that declare ``domain_incremental``."""
    from pathlib import Path

    from hydra.utils import get_object

    found = []
    for path in sorted((Path(__file__).parent / "conf" / "method").glob("*.yaml")):
        section = OmegaConf.load(path)
        capabilities = getattr(get_object(section._target_), "CAPABILITIES", None)
        if capabilities is not None and capabilities.domain_incremental:
            found.append(str(section.get("name", path.stem)))
    return found
