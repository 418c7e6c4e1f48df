"""One source of truth for each method's defaults: ``conf/method/<name>.yaml`` states exactly the
constructor's signature defaults (a drift fails here), and its training-budget keys follow the protocol's
``budget``."""

from __future__ import annotations

import inspect

import pytest
from helpers import CONF_DIR
from omegaconf import OmegaConf

from cl_bench.config import BudgetConfig, resolve_target, target_parameters

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
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
