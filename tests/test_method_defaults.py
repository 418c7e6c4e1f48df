"""One source of truth for each method's defaults: ``conf/method/<name>.yaml`` states exactly the
constructor's signature defaults, the shared training keywords it inherits through ``**base_args`` included
(a drift fails here), its training-budget keys follow the protocol's ``budget``, and every method follows the
constructor convention of :class:`~cl_bench.methods.base.ContinualModule`: a shared keyword is listed only
with a default of its own, the rest forwarded with ``**base_args``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import pytest
from helpers import CONF_DIR, TinyBackbone
from omegaconf import OmegaConf

import cl_bench.methods
from cl_bench.config import BudgetConfig, resolve_target, target_parameters, validate_target_group
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
#: The shared training keywords: the base constructor's arguments but the backbone.
SHARED = [n for n in inspect.signature(ContinualModule.__init__).parameters if n not in ("self", "backbone")]


def method_classes() -> list[type[ContinualModule]]:
    """Every ``ContinualModule`` subclass defined in ``cl_bench/methods/`` (shared bases included)."""
    classes = []
    for info in pkgutil.iter_modules(cl_bench.methods.__path__):
        module = importlib.import_module(f"cl_bench.methods.{info.name}")
        classes += [
            c
            for c in vars(module).values()
            if inspect.isclass(c)
            and issubclass(c, ContinualModule)
            and c is not ContinualModule
            and c.__module__ == module.__name__
        ]
    return sorted(classes, key=lambda c: c.__qualname__)


CLASSES = method_classes()
BUDGET_KEYS = set(BudgetConfig.__dataclass_fields__)
#: Budget keys a method keeps to itself, with the reason.
OWN_VALUES = {("lnt", "scheduler"): "constant is the only schedule LayerNorm tuning supports"}


def method_file(name: str):
    import cl_bench.config  # noqa: F401  (the budget resolver)

    return OmegaConf.merge(
        OmegaConf.structured({"budget": BudgetConfig()}),
        {"method": OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")},
    )


def as_plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", METHODS)
def test_config_file_states_the_signature_defaults(name: str) -> None:
    cfg = method_file(name)
    assert cfg.method.name == name
    params, _, _ = target_parameters(resolve_target("method", cfg.method))
    params.pop("backbone")
    values = OmegaConf.to_container(cfg.method, resolve=True)
    keys = set(values) - {"_target_", "name"}
    assert keys == set(params), (
        f"conf/method/{name}.yaml lacks {set(params) - keys}, has extra {keys - set(params)}"
    )
    for key in sorted(keys):
        default = params[key].default
        assert default is not inspect.Parameter.empty, f"{name}.{key} has no default in the signature"
        assert (
            values[key] == as_plain(default)
            and type(values[key]) is type(as_plain(default))
            or (isinstance(default, float) and values[key] == default)
        ), f"conf/method/{name}.yaml {key}={values[key]!r} but the constructor's default is {default!r}"


@pytest.mark.parametrize("name", METHODS)
def test_budget_keys_follow_the_protocols_budget(name: str) -> None:
    cfg = method_file(name)
    budget = {
        "epochs": 7,
        "batch_size": 3,
        "lr": 0.5,
        "momentum": 0.25,
        "weight_decay": 0.125,
        "scheduler": "cosine",
    }
    cfg.budget = budget
    for key in sorted(BUDGET_KEYS & set(cfg.method)):
        if (name, key) in OWN_VALUES:
            assert cfg.method[key] != budget[key]
            continue
        assert cfg.method[key] == budget[key], (
            f"conf/method/{name}.yaml: write {key}: ${{budget:{key},DEFAULT}}"
        )


def own_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The parameters of ``cls``'s own ``__init__`` (empty if it has none)."""
    if "__init__" not in cls.__dict__:
        return {}
    return dict(inspect.signature(cls.__dict__["__init__"]).parameters)


def inherited_parameter(cls: type, name: str) -> inspect.Parameter | None:
    """Keyword ``name`` as ``cls`` takes it: from the nearest class in its MRO whose ``__init__`` lists it,
    provided every ``__init__`` before it forwards ``**``; ``None`` if not taken or refused (independent of
    :func:`cl_bench.config.target_parameters`)."""
    if name in getattr(cls, "refused_base_args", ()):
        return None
    for klass in cls.__mro__:
        params = own_parameters(klass)
        if name in params:
            return params[name]
        if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return None
    return None


def convention_breaches(cls: type) -> list[str]:
    """How ``cls``'s own constructor breaks the convention of the base class docstring."""
    params = own_parameters(cls)
    if not params:
        return []
    parent = next(c for c in cls.__mro__[1:] if "__init__" in c.__dict__)
    inherited, _, _ = target_parameters(parent) if issubclass(parent, ContinualModule) else ({}, {}, False)
    breaches = [
        f"re-lists {name}={p.default!r}, the default it inherits from {parent.__name__}"
        for name, p in params.items()
        if name in inherited
        and p.default is not p.empty
        and type(p.default) is type(inherited[name].default)
        and as_plain(p.default) == as_plain(inherited[name].default)
    ]
    var_keyword = [p for p in params.values() if p.kind == p.VAR_KEYWORD]
    if var_keyword and var_keyword[0].name != "base_args":
        breaches.append(f"forwards **{var_keyword[0].name}; name it **base_args")
    listed = sorted(set(SHARED) & set(params))
    if not var_keyword and listed:
        breaches.append(f"lists {listed} and takes no **base_args to forward the other shared keywords")
    return breaches


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_constructors_list_only_keywords_whose_default_differs(cls: type) -> None:
    assert convention_breaches(cls) == [], f"{cls.__module__}.{cls.__qualname__}"


def test_the_convention_check_catches_a_relisted_default_and_a_missing_forward() -> None:
    class Relisting(ContinualModule):
        def __init__(self, backbone, lr: float = 0.01, momentum: float = 0.0, **base_args: Any) -> None:
            super().__init__(backbone, lr=lr, momentum=momentum, **base_args)

    class Listing(ContinualModule):
        def __init__(self, backbone, epochs: int = 3) -> None:
            super().__init__(backbone, epochs=epochs)

    class Sub(Relisting):
        def __init__(self, backbone, momentum: float = 0.0, **args: Any) -> None:
            super().__init__(backbone, momentum=momentum, **args)

    assert convention_breaches(Relisting) == [
        "re-lists lr=0.01, the default it inherits from ContinualModule"
    ]
    assert convention_breaches(Listing) == [
        "lists ['epochs'] and takes no **base_args to forward the other shared keywords"
    ]
    assert convention_breaches(Sub) == [
        "re-lists momentum=0.0, the default it inherits from Relisting",
        "forwards **args; name it **base_args",
    ]


@pytest.mark.parametrize("name", METHODS)
def test_config_file_states_the_inherited_shared_keywords(name: str) -> None:
    """Every shared keyword a method takes, listed or forwarded, is in its file with the default it gets from
    the nearest class that lists it; refused ones are absent."""
    cfg = method_file(name)
    cls = resolve_target("method", cfg.method)
    values = OmegaConf.to_container(cfg.method, resolve=True)
    for key in SHARED:
        parameter = inherited_parameter(cls, key)
        if parameter is None:
            assert key not in values, f"conf/method/{name}.yaml: {cls.__name__} does not take {key}"
            continue
        default = as_plain(parameter.default)
        assert key in values, f"conf/method/{name}.yaml lacks {key} (default {default!r})"
        assert values[key] == default, f"conf/method/{name}.yaml {key}={values[key]!r}, inherited {default!r}"


def test_refused_keywords_are_shared_ones_and_fail_in_the_config_and_the_constructor() -> None:
    from cl_bench.methods.linear_probe import LinearProbe

    for cls in CLASSES:
        assert cls.refused_base_args <= set(SHARED), cls.__name__
    cfg = method_file("linear_probe").method
    validate_target_group("method", cfg)
    with pytest.raises(ConfigError, match=r"method\.backbone_lr is not a setting of method=linear_probe"):
        validate_target_group("method", OmegaConf.merge(cfg, {"backbone_lr": 0.1}))
    with pytest.raises(ConfigError, match=r"method\.backbone_lr: LinearProbe does not take it"):
        LinearProbe(TinyBackbone(), backbone_lr=0.1)
    assert LinearProbe(TinyBackbone(), lr=0.1).backbone_lr == 0.1
