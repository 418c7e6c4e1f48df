"""Sweep presets (``sweep=seeds_x_orders``, ``sweep=all_methods``) and the jobs they expand to."""

from __future__ import annotations

import itertools

import pytest
from conftest import CONF_DIR
from omegaconf import OmegaConf

from cl_bench.report import expand_sweep


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    import cl_bench.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def jobs(*overrides: str) -> list[dict[str, str]]:
    """The runs ``cl-bench -m OVERRIDES`` starts, each as {key: value}."""
    sweep_overrides = [o for o in overrides if "," in o or "glob(" in o]
    cfg = composed(*(o for o in overrides if o not in sweep_overrides))
    preset = cfg.hydra.sweeper.params
    params = {} if preset is None else OmegaConf.to_container(preset)
    assert isinstance(params, dict)
    return [dict(o.split("=", 1) for o in job) for job in expand_sweep(params, list(overrides))]


def test_seeds_x_orders_is_three_seeds_times_three_orders_per_method() -> None:
    runs = jobs("sweep=seeds_x_orders", "method=seq_ft,simplecil")
    assert len(runs) == 18
    combos = {(r["method"], r["seed"], r["scenario.order_seed"]) for r in runs}
    expected = set(itertools.product(["seq_ft", "simplecil"], ["0", "1", "2"], ["1993", "0", "1"]))
    assert combos == expected


def test_a_command_line_override_replaces_the_presets_axis() -> None:
    runs = jobs("sweep=seeds_x_orders", "seed=5")
    assert len(runs) == 3 and {r["seed"] for r in runs} == {"5"}


def test_the_issues_sweep_command_expands_to_every_combination() -> None:
    runs = jobs("method=seq_ft,lwf", "scenario.order_seed=1993,0,1", "seed=0,1,2")
    assert len(runs) == 18 and len({tuple(sorted(r.items())) for r in runs}) == 18


def test_all_methods_runs_every_method_config() -> None:
    runs = jobs("sweep=all_methods")
    methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    assert sorted(r["method"] for r in runs) == methods


@pytest.mark.parametrize("preset", ["seeds_x_orders", "all_methods"])
def test_presets_leave_the_run_config_alone(preset: str) -> None:
    cfg = composed(f"sweep={preset}")
    default = composed()
    for key in ("seed", "scenario", "method"):
        assert cfg[key] == default[key]
