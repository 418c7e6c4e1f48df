"""Config composition of every config file, and validation errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF_DIR, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from cl_bench.compatibility import UnsupportedBackboneError
from cl_bench.config import validate_config
from cl_bench.errors import ConfigError

#: Values for mandatory (???) keys of some options.
REQUIRED = {
    ("dataset", "npz"): ["dataset.path=/tmp/x.npz"],
    ("backbone", "timm"): ["backbone.name=vit_tiny_patch16_224"],
    ("dataset", "image_folder"): ["dataset.root=/tmp/x"],
}
GROUPS = ("dataset", "backbone", "method", "scenario", "trainer", "logger", "paths", "protocol", "experiment")


def options(group: str) -> list[str]:
    """Every option of ``group``, including presets in sub-folders (``experiment=confit/cifar100``)."""
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_config_file_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}", *REQUIRED.get((group, option), []))
    try:
        validate_config(cfg)
    except UnsupportedBackboneError:  # a ViT-only method on the quickstart's CNN: its own backbone kind
        validate_config(compose_config(f"{group}={option}", "backbone=vit_tiny6_cifar"))
    if group in ("dataset", "backbone", "method"):
        assert cfg[group].name, f"{group}/{option}.yaml needs a name"
        assert cfg[group]._target_.startswith("cl_bench.")


def test_default_is_the_quickstart() -> None:
    cfg = compose_config()
    assert (cfg.dataset.name, cfg.backbone.name, cfg.method.name) == ("digits", "resnet20_cifar", "seq_ft")
    assert cfg.scenario.n_tasks == 5
    assert cfg.logger.mode.value == "offline"


def test_experiment_preset_overrides_groups() -> None:
    cfg = compose_config("experiment=cifar100_resnet32")
    assert cfg.dataset.name == "cifar100" and cfg.backbone.depth == 32 and cfg.scenario.n_tasks == 10


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CL_BENCH_DATA", str(tmp_path))
    assert compose_config().paths.data_dir == str(tmp_path)
    monkeypatch.delenv("CL_BENCH_DATA")
    monkeypatch.setenv("HOME", "/home/someone")
    assert compose_config().paths.data_dir == "/home/someone/.cache/cl_bench"


def test_logger_tags_runs_for_a_dashboard() -> None:
    """Name and group are left to the tracker (the method plus changed overrides, and the protocol:
    tests/test_tracking.py); the tags come from the config."""
    cfg = compose_config("method=simplecil", "seed=3", "scenario.order_seed=1997")
    assert cfg.logger.name is None and cfg.logger.group is None
    assert list(cfg.logger.tags) == ["digits", "simplecil", "resnet20_cifar", "cil", "seed3", "order1997"]


def test_unknown_group_option_lists_valid_ones() -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_config("method=does_not_exist")
    assert "seq_ft" in str(err.value) and "simplecil" in str(err.value)


def test_misspelt_schema_key_fails_naming_it() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("scenario.n_task=3")
    assert "n_task" in str(err.value)


def test_wrong_type_in_schema_fails() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config("scenario.n_tasks=ten")
    assert "n_tasks" in str(err.value)


def test_invalid_enum_lists_choices() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config("scenario.type=xil")
    assert "cil" in str(err.value.__cause__ or err.value) and "til" in str(err.value.__cause__ or err.value)


def test_unknown_method_key_added_with_plus_fails_at_validation() -> None:
    cfg = compose_config("+method.lrr=0.1")
    with pytest.raises(ConfigError, match=r"unknown key method\.lrr.*valid keys: .*lr"):
        validate_config(cfg)


def test_wrong_type_for_method_key_fails_at_validation() -> None:
    cfg = compose_config("method.epochs=1.5")
    with pytest.raises(ConfigError, match=r"method\.epochs=1\.5 has the wrong type"):
        validate_config(cfg)


def test_missing_mandatory_value_says_what_to_set() -> None:
    cfg = compose_config("dataset=npz")
    with pytest.raises(ConfigError, match=r"dataset\.path=VALUE"):
        validate_config(cfg)


def test_runner_injected_argument_cannot_be_set() -> None:
    cfg = compose_config("+method.backbone=x")
    with pytest.raises(ConfigError, match="set by the runner"):
        validate_config(cfg)


def test_scenario_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        validate_config(compose_config("scenario.n_tasks=0"))
    with pytest.raises(ConfigError, match="init_classes"):
        validate_config(compose_config("scenario.n_tasks=null"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+scenario.n_task=3", r"unknown key scenario\.n_task"),
        ("+seedd=1", r"unknown top-level key 'seedd'"),
        ("+transform.foo=1", r"unknown key transform\.foo"),
        ("scenario.order_seed=-1", r"order_seed=-1 must lie in"),
        ("seed=-1", r"seed=-1 must lie in \[0, 2\*\*32\)"),
        ("seed=4294967296", r"seed=4294967296 must lie in"),
        ("trainer.devices=0", r"trainer\.devices=0: give a number of devices >= 1"),
        ("trainer.devices=-2", r"trainer\.devices=-2: give"),
        ("trainer.devices=[]", r"trainer\.devices=\[\]: give"),
        ("trainer.devices=two", r"trainer\.devices='two': give"),
        ("trainer.num_nodes=0", r"trainer\.num_nodes=0 must be at least 1"),
        ("trainer.precision=17", r"trainer\.precision='17': use one of .*32-true"),
    ],
)
def test_added_or_out_of_range_keys_fail_at_validation(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(override))


@pytest.mark.parametrize(
    "override",
    [
        "trainer.devices=auto",
        "trainer.devices=-1",
        "trainer.devices=2",
        "trainer.devices='0,1'",
        "trainer.devices=[0,1]",
        "trainer.precision=bf16-mixed",
        "trainer.precision=16",
        "seed=4294967295",
    ],
)
def test_values_lightning_accepts_pass_validation(override: str) -> None:
    validate_config(compose_config(override))


def test_experiment_preset_keeps_the_users_scenario_choice() -> None:
    cfg = compose_config("experiment=cifar100_resnet32", "scenario=til")
    assert cfg.scenario.type.value == "til" and cfg.scenario.n_tasks == 10


def test_timm_backbone_gets_its_model_name() -> None:
    from cl_bench.config import build_from_config

    cfg = compose_config("backbone=timm", "backbone.name=resnet18", "backbone.pretrained=false")
    validate_config(cfg)
    backbone = build_from_config("backbone", cfg.backbone)
    assert backbone.name == "resnet18" and backbone.feat_dim == 512


def test_methods_forwarding_kwargs_are_checked_against_the_base_signature() -> None:
    """EWC takes ``**base_args`` for ContinualModule: base keys are accepted and type-checked, others fail."""
    from omegaconf import OmegaConf

    from cl_bench.config import target_parameters, validate_target_group
    from cl_bench.methods.ewc import EWC

    params, hints, accepts_any = target_parameters(EWC)
    assert not accepts_any and {"ewc_lambda", "epochs", "loss_scope"} <= set(params)
    assert hints["epochs"] is int
    ok = OmegaConf.create({"_target_": "cl_bench.methods.ewc.EWC", "name": "ewc", "epochs": 3, "lr": 0.1})
    validate_target_group("method", ok)
    with pytest.raises(ConfigError, match="unknown key method.epoch "):
        validate_target_group("method", OmegaConf.merge(ok, {"epoch": 3}))
    with pytest.raises(ConfigError, match="method.epochs='3' has the wrong type"):
        validate_target_group("method", OmegaConf.merge(ok, {"epochs": "3"}))
