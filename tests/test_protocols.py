"""Every method in every protocol: ``protocol=P method=M`` composes and validates (no training) unless the
method declares it cannot run on P's backbone, or P is domain-incremental and the method does not declare
that it can learn it; paper presets are protocol + method; tuned values and the shared budget reach exactly
the methods they are meant for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cl_bench.compatibility import UnsupportedBackboneError, UnsupportedScenarioError
from cl_bench.config import validate_config


def options(group: str) -> list[str]:
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


PROTOCOLS = options("protocol")
METHODS = options("method")
#: Methods that need a ViT (PET modules, LoRA) or LayerNorms, and those that need conv + BatchNorm.
VIT_ONLY = {"aper", "ranpac", "safe", "slca_pp", "lnt", "l2p", "dualprompt", "coda_prompt", "ease"}
CNN_ONLY = {"confit"}
#: Methods that can learn domain-incremental scenarios (scenario=dil).
DIL_METHODS = {"seq_ft", "simplecil", "ranpac", "aper", "safe"}


#: Composing one protocol with every method takes seconds (Hydra composes each pair from its files), so the
#: fast lane checks one protocol per kind (a CNN, a small ViT, a ViT-B paper protocol, a DIL one) and the
#: slow lane (``make test-all``, CI) all of them.
FAST_PROTOCOLS = {"cifar100_resnet32", "cifar100_b50_vit_tiny", "slca/cifar100", "safe/domainnet_dil"}


def lane(names: list[str], fast: set[str]) -> list:
    """``names`` as test parameters, those outside ``fast`` marked slow."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def compose_many(*runs: list[str]) -> list:
    import cl_bench.config  # noqa: F401  (schemas and the budget resolver)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return [compose(config_name="config", overrides=overrides) for overrides in runs]


def is_vit(cfg) -> bool:
    return "vit" in str(cfg.backbone.name)


@pytest.mark.parametrize("protocol", lane(PROTOCOLS, FAST_PROTOCOLS))
def test_every_method_composes_and_validates_in_the_protocol(protocol: str) -> None:
    configs = compose_many(*[[f"protocol={protocol}", f"method={m}"] for m in METHODS])
    unsupported: dict[str, str] = {}
    for method, cfg in zip(METHODS, configs):
        assert cfg.method.name == method
        try:
            validate_config(cfg)
        except (UnsupportedBackboneError, UnsupportedScenarioError) as exc:
            unsupported[method] = str(exc)
    wrong_backbone = CNN_ONLY if is_vit(configs[0]) else VIT_ONLY
    wrong_scenario = set(METHODS) - DIL_METHODS if configs[0].scenario.type == "dil" else set()
    assert set(unsupported) == wrong_backbone | wrong_scenario, unsupported
    for method, reason in unsupported.items():  # the backbone is checked first
        if method in wrong_backbone:
            assert f"method={method} cannot run on the backbone" in reason and "it needs" in reason
        else:
            assert f"method={method} cannot run scenario=dil" in reason and "domain_incremental" in reason


def test_peft_none_and_no_lora_run_on_a_cnn() -> None:
    for overrides in (
        ["method=ranpac", "method.peft=none"],
        ["method=aper", "method.peft=none"],
        ["method=slca_pp", "method.hybrid=false"],
    ):
        (cfg,) = compose_many(["protocol=cifar100_resnet32", *overrides])
        validate_config(cfg)


@pytest.mark.parametrize("method", ["ranpac", "aper", "slca_pp", "l2p"])
def test_a_refusal_names_the_setting_that_runs_on_any_backbone(method: str) -> None:
    """RanPAC on the ResNet-32 protocol was refused without a word about ``method.peft=none``, with which it
    runs there; the named setting must indeed pass (and a method without one names none)."""
    (cfg,) = compose_many(["protocol=cifar100_resnet32", f"method={method}"])
    with pytest.raises(UnsupportedBackboneError) as err:
        validate_config(cfg)
    named = re.search(r"set method\.(\S+) \(runs on any backbone\)", str(err.value))
    if method == "l2p":
        assert named is None and "set method." not in str(err.value)
        return
    assert named is not None, str(err.value)
    (cfg,) = compose_many(["protocol=cifar100_resnet32", f"method={method}", f"method.{named.group(1)}"])
    validate_config(cfg)


@pytest.mark.parametrize("experiment", lane(options("experiment"), FAST_PROTOCOLS))
def test_an_experiment_is_its_protocol_and_method(experiment: str) -> None:
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    defaults = OmegaConf.create(text).defaults
    choices = {k.removeprefix("override /"): v for entry in defaults for k, v in entry.items()}
    protocol, method = choices["protocol"], choices.get("method", "seq_ft")
    from_preset, from_parts = compose_many(
        [f"experiment={experiment}"], [f"protocol={protocol}", f"method={method}"]
    )
    resolved = [OmegaConf.to_container(c, resolve=True) for c in (from_preset, from_parts)]
    assert resolved[0] == resolved[1]


TUNED = options("tuned")


@pytest.mark.parametrize("tuned", lane(TUNED, {t for t in TUNED if t.split("/", 1)[1] in FAST_PROTOCOLS}))
def test_tuned_values_apply_to_their_method_in_their_protocol_only(tuned: str) -> None:
    method, protocol = tuned.split("/", 1)
    assert method in METHODS and protocol in PROTOCOLS, f"tuned/{tuned}.yaml: no method {method} or protocol"
    values = OmegaConf.to_container(
        compose_many([f"protocol={protocol}", f"method={method}"])[0].method, resolve=True
    )
    own = OmegaConf.load(CONF_DIR / "tuned" / f"{tuned}.yaml")
    own = {k: v for k, v in OmegaConf.to_container(own).items() if k != "defaults"}
    method_keys = set(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"))
    assert set(own) <= method_keys, f"tuned/{tuned}.yaml sets keys that {method} lacks"
    assert not set(own) & {"epochs", "batch_size"}, "epochs and batch size are the protocol's budget"
    assert {k: values[k] for k in own} == own
    # another method in the same protocol keeps its own values
    (baseline,) = compose_many([f"protocol={protocol}", "method=seq_ft"])
    assert baseline.method.name == "seq_ft"


def test_a_paper_preset_with_a_baseline_drops_the_papers_method_keys() -> None:
    (cfg,) = compose_many(["experiment=slca/cifar100", "method=seq_ft"])
    validate_config(cfg)
    assert "milestones" not in cfg.method and (cfg.method.epochs, cfg.method.batch_size) == (20, 128)
    assert cfg.method.lr == 0.01 and cfg.method.scheduler == "cosine"  # seq_ft's own optimiser


def test_budget_reaches_every_method_and_a_method_key_wins() -> None:
    slca, seq_ft, simplecil, own = compose_many(
        ["experiment=slca/cifar100", "budget.epochs=1"],
        ["experiment=confit/cifar100", "method=seq_ft", "budget.epochs=1"],
        ["experiment=confit/cifar100", "method=simplecil"],
        ["experiment=confit/cifar100", "method=seq_ft", "budget.epochs=1", "method.epochs=3"],
    )
    assert slca.method.epochs == 1 and list(slca.method.milestones) == [18]
    assert (seq_ft.method.epochs, seq_ft.method.batch_size, seq_ft.method.momentum) == (1, 128, 0.0)
    validate_config(simplecil)  # nothing to train: the budget does not apply
    assert own.method.epochs == 3


def test_user_presets_from_another_folder(tmp_path: Path) -> None:
    """``hydra.searchpath`` (or ``--config-dir``) adds a user's protocols and tuned values to the shipped."""
    (tmp_path / "protocol").mkdir()
    (tmp_path / "tuned" / "lwf").mkdir(parents=True)
    (tmp_path / "protocol" / "my_digits.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: digits\n"
        "budget:\n  epochs: 2\nscenario:\n  n_tasks: 2\n"
    )
    (tmp_path / "tuned" / "lwf" / "my_digits.yaml").write_text("alpha: 0.5\n")
    lwf, er = compose_many(
        [f"hydra.searchpath=[file://{tmp_path}]", "protocol=my_digits", "method=lwf"],
        [f"hydra.searchpath=[file://{tmp_path}]", "protocol=my_digits", "method=er"],
    )
    assert (lwf.method.alpha, lwf.method.epochs, lwf.scenario.n_tasks) == (0.5, 2, 2)
    assert er.method.epochs == 2 and "alpha" not in er.method
