"""Config schemas and validation.

Two kinds of config group exist:

* *Schema groups* (``scenario``, ``trainer``, ``logger``, ``paths``, ``transform``, ``budget``) are typed
  dataclasses registered in Hydra's ConfigStore as the base of ``cl_bench/conf/config.yaml``: a misspelt key
  or a wrongly typed value fails while Hydra composes the config, with a message naming the key.
* *Target groups* (``dataset``, ``backbone``, ``method``) name the Python callable that builds them with
  ``_target_`` and carry its keyword arguments. :func:`validate_config` checks every key against the
  callable's signature and type hints before any data is loaded, so a typo in a YAML file or a ``+key=``
  override fails at start, listing the valid keys.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING as MISSING_FACTORY
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from cl_bench.errors import ConfigError

#: The configs shipped inside the package (``cl_bench/conf``).
CONF_DIR = Path(__file__).resolve().parent / "conf"
#: Keys of a target group that are not arguments of its callable (``name`` is passed on only to callables
#: that take a ``name`` argument, such as the timm backbone).
RESERVED_KEYS = ("_target_", "name")
#: The target groups and the arguments the runner passes itself (never set in config).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "dataset": (),
    "backbone": (),
    "method": ("backbone",),
}


class _StrEnum(str, Enum):
    """An enum whose members interpolate as their value (``${scenario.type}`` -> ``cil``)."""

    def __str__(self) -> str:
        return str(self.value)


class ScenarioType(_StrEnum):
    """``cil``: no task id at test time; ``til``: the task id is given at test time; ``dil``: each task is one
    domain holding every class (domain-incremental), no task id at test time."""

    cil = "cil"
    til = "til"
    dil = "dil"


class LoggerMode(_StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LoggerBackend(_StrEnum):
    """Where per-task metrics go (``logger=NAME``, see :mod:`cl_bench.tracking`)."""

    wandb = "wandb"
    csv = "csv"
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    none = "none"


class TrainAugment(_StrEnum):
    """Train-time augmentation. ``auto``: ``crop_flip`` for inputs of at most 64 px, else ``rrc_flip``."""

    auto = "auto"
    crop_flip = "crop_flip"  # pad 4 + random crop + horizontal flip (CIFAR recipe, He et al. 2016)
    rrc_flip = "rrc_flip"  # RandomResizedCrop + horizontal flip (ImageNet recipe; SLCA/PILOT use it)
    #: square resize to ``transform.train_resize`` + random crop + flip (SLCA on CUB/Cars: 300 -> 224)
    resize_crop_flip = "resize_crop_flip"
    none = "none"  # the evaluation transform


@dataclass
class ScenarioConfig:
    """How classes are ordered and split into tasks (see :mod:`cl_bench.scenario`)."""

    type: ScenarioType = ScenarioType.cil
    n_tasks: int | None = 10
    init_classes: int | None = None
    increment: int | None = None
    order_seed: int | None = 1993
    class_order: list[int] | None = None
    #: ``type=dil``: the dataset's domains in the order they are learnt, one task each (``null``: the
    #: dataset's own order); must stay ``null`` for the other types.
    domains: list[str] | None = None


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every task, and data loading."""

    accelerator: str = "auto"
    devices: Any = 1
    #: Machines (DDP over SLURM nodes); processes in all = ``devices * num_nodes``.
    num_nodes: int = 1
    #: Lightning strategy: ``auto`` (one device), ``ddp``, ``ddp_find_unused_parameters_true``.
    strategy: str = "auto"
    #: DDP: BatchNorm statistics over the global batch instead of each process's share.
    sync_batchnorm: bool = False
    precision: str = "32-true"
    deterministic: bool = True
    num_workers: int = 0
    #: CPU threads of each process of the run (torch, OpenMP/BLAS; caps its data workers); ``null``:
    #: ``OMP_NUM_THREADS`` if set, else the available cores / ``concurrent_jobs`` / the run's DDP processes
    #: on this machine (:mod:`cl_bench.threads`).
    threads: int | None = None
    #: Runs sharing the machine's cores at once (``launcher=local`` sets its ``n_jobs``).
    concurrent_jobs: int = 1
    #: Head-only phases (a head on cached features) train by a plain loop with the same optimiser, schedule,
    #: batches and result instead of a Lightning fit (:func:`cl_bench.learning.head_fast_path`).
    head_fast_path: bool = True
    eval_batch_size: int = 256
    #: Drop the last partial training batch of every phase (``true``) or keep it (``false``); ``null``: each
    #: method's official loader (ConFiT drops it, the others keep it).
    drop_last: bool | None = None
    enable_progress_bar: bool = False
    log_every_n_steps: int = 10
    #: Cap on the epochs of every training phase, i.e. every Lightning fit (``null``: the phase's own);
    #: ``debug=smoke`` sets 1.
    max_epochs: int | None = None
    #: Training batches per epoch: a count (int) or a fraction of the loader (float); ``null``: all.
    limit_train_batches: Any = None
    #: Test batches per task's test set at each evaluation (an evenly spread subset); ``null``: all.
    limit_eval_batches: int | None = None
    #: Gradient clipping (Lightning's ``gradient_clip_val``/``_algorithm``: ``norm`` or ``value``).
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    #: Optimizer step every N batches (the effective batch is ``N * method.batch_size``).
    accumulate_grad_batches: int = 1
    #: Lightning profiler per training phase: ``simple``, ``advanced`` or ``pytorch`` (reports and traces in
    #: RUN_DIR/profiler/, named ``task_NN_<phase>``).
    profiler: str | None = None


@dataclass
class LoggerConfig:
    """The experiment tracker (``logger=wandb|csv|tensorboard|mlflow|none``, see :mod:`cl_bench.tracking`).

    W&B ``mode``: ``offline`` needs no account (``wandb sync RUN_DIR/wandb/offline-run-*`` later).
    """

    backend: LoggerBackend = LoggerBackend.wandb
    mode: LoggerMode = LoggerMode.offline
    project: str = "cl_bench"
    entity: str | None = None
    #: ``null``: the benchmark protocol (dataset, scenario, split, backbone), the same in every sweep.
    group: str | None = None
    #: ``null``: the method and the command-line overrides that differ from the preset.
    name: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    #: CSV/TensorBoard: the folder (``null``: RUN_DIR/<backend>); MLflow: its local file store.
    save_dir: str | None = None
    #: MLflow server or database URI (``null``: the file store in ``save_dir``).
    tracking_uri: str | None = None


@dataclass
class PathsConfig:
    data_dir: str = MISSING
    output_dir: str = "outputs"
    #: The run folder; ``null`` means Hydra's output dir (``hydra.run.dir``).
    run_dir: str | None = None


@dataclass
class TransformConfig:
    """Input pipeline. Size, mean/std and interpolation come from the backbone unless set here."""

    train: TrainAugment = TrainAugment.auto
    #: ``null``: the dataset decides whether a horizontal flip keeps the label (digits: no).
    hflip: bool | None = None
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    #: ``false``: feed images scaled to [0, 1] without mean/std normalisation (the official RanPAC, APER and
    #: SimpleCIL ViT code does so), whatever ``mean``/``std`` say.
    normalize: bool = True
    #: ``rrc_flip``: RandomResizedCrop's area fraction and aspect-ratio ranges (torchvision's defaults;
    #: SAFE/RanPAC/LN tuning use scale [0.05, 1]).
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    #: ``resize_crop_flip``: the side of the square resize before the random crop (SLCA CUB/Cars: 300).
    train_resize: int | None = None
    #: ColorJitter brightness after the flip: factor drawn from [max(0, 1 - b), 1 + b]; 0 = none (SLCA CIFAR:
    #: 63/255).
    brightness: float = 0.0
    #: Evaluation: ``null`` resizes the shorter side to ``input_size / crop_pct`` (timm, the backbone's
    #: crop_pct); ``R`` resizes it to R (``Resize(R) + CenterCrop(input_size)``, e.g. 256 or 224).
    eval_resize: int | None = None
    #: Resize interpolation (``bilinear``, ``bicubic``, ``nearest``) of the train / eval pipelines; ``null``:
    #: the backbone's.
    train_interpolation: str | None = None
    eval_interpolation: str | None = None
    #: Where the train-time augmentation runs: ``true`` on whole uint8 batches on the training device
    #: (:mod:`cl_bench.data.batch_transforms`), ``false`` image by image in the data loader, ``null`` (auto):
    #: on the device when it is a GPU and the images have one fixed size.
    on_device: bool | None = None


@dataclass
class DebugConfig:
    """Debug runs (``debug=smoke``, :mod:`cl_bench.debug`): marked in results.json, left out of reports."""

    #: A smoke run: checks that a preset runs end to end; its numbers mean nothing.
    smoke: bool = False
    #: Keep only the first N train and N test images of each class (``null``: all).
    samples_per_class: int | None = None
    #: Learn (and evaluate) only the first N tasks of the scenario (``null``: all).
    max_tasks: int | None = None
    #: Upper bounds on method sizes, applied to each key the chosen method has (e.g. ``batch_size: 4``,
    #: ``rp_dim: 256``): a smoke run of any preset stays small. Recorded capped in results.json.
    method_caps: dict[str, int] = field(default_factory=dict)
    #: Nothing is downloaded, and a backbone whose weights are not on this machine (no file, not in the
    #: Hugging Face cache) starts from random weights instead of stopping the run (smoke runs only).
    random_weights_if_missing: bool = False
    #: Feed images of at most this side (``null``: the preset's size). The train recipe stays the preset's,
    #: its resize sides scale with it, and a ViT is set to this resolution (its position embedding
    #: resampled, as timm does for weights of another resolution): a smoke run of a ViT-B/16 preset then
    #: computes 5 tokens per image instead of 197, with every block, width and method part in place.
    input_size: int | None = None


@dataclass
class BudgetConfig:
    """The training budget a protocol (``protocol=``) gives every method that trains; ``null``: each method's
    own value. A method config reads them as ``${budget:KEY,DEFAULT}``, so ``budget.epochs=1`` shortens every
    method of a sweep while ``method.epochs=1`` still sets one method's value."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    scheduler: str | None = None


@dataclass
class RunConfig:
    """The whole run. ``dataset``, ``backbone`` and ``method`` are target groups (see module docstring)."""

    dataset: Any = MISSING
    backbone: Any = MISSING
    method: Any = MISSING
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0
    #: No progress display (neither the terminal status line nor the per-epoch log lines).
    quiet: bool = False
    #: Save the final model state (``final_model.pt``) in the run folder.
    save_model: bool = True
    #: Write a checkpoint after every task so that an interrupted run can resume (deleted at the end).
    save_checkpoints: bool = True
    #: ``auto``: continue an interrupted run of the same config if there is one (this run folder, else the
    #: newest one listed in the resume index under ``paths.output_dir``, :mod:`cl_bench.run_folder`);
    #: ``never``: always start afresh; or the path of a run folder.
    resume: str = "auto"


def budget_value(key: str, default: Any, *, _root_: DictConfig) -> Any:
    """``${budget:KEY,DEFAULT}``: the protocol's ``budget.KEY``, or ``DEFAULT`` where it is null or absent."""
    value = OmegaConf.select(_root_, f"budget.{key}", default=None)
    return default if value is None else value


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (``cl_bench/conf/config.yaml`` lists ``base_config``
    first) and the ``budget`` resolver that method configs use."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    OmegaConf.register_new_resolver("budget", budget_value, replace=True)


register_configs()


def resolve_target(group: str, section: DictConfig) -> Callable[..., Any]:
    """Import the callable named by ``section._target_``."""
    target = section.get("_target_")
    if not target:
        raise ConfigError(
            f"{group}: no '_target_' key; every {group} config must name the callable that builds it"
        )
    try:
        return get_object(target)
    except Exception as exc:  # hydra raises ImportError / ValueError variants
        raise ConfigError(f"{group}._target_={target!r} cannot be imported: {exc}") from exc


def _takes(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def target_kwargs(fn: Callable[..., Any], section: DictConfig) -> dict[str, Any]:
    """The keyword arguments for ``fn``: every key but the reserved ones (``name`` if ``fn`` takes it)."""
    data = OmegaConf.to_container(section, resolve=True)
    assert isinstance(data, dict)
    return {k: v for k, v in data.items() if k not in RESERVED_KEYS or (k == "name" and _takes(fn, k))}


def _type_matches(value: Any, hint: Any) -> bool:
    """Loose runtime check of a config value against a type hint (int, float, str, bool, lists, optionals)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if value is None:
        return False
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(hint)
        return not args or all(_type_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def target_parameters(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named parameters and type hints of ``fn``, and whether it accepts any other keyword.

    A class whose ``__init__`` takes ``**kwargs`` forwards them to its base class (``super().__init__(
    **kwargs)``), so it also accepts the keywords of the base classes' ``__init__`` up to the first one
    without ``**kwargs``; a subclass's parameter or hint wins over its base's. Keywords a class names in
    ``refused_base_args`` (:attr:`cl_bench.methods.base.ContinualModule.refused_base_args`) are not accepted.
    """
    inits = (
        [c.__dict__["__init__"] for c in fn.__mro__ if "__init__" in c.__dict__]
        if inspect.isclass(fn)
        else [fn]
    )
    refused = getattr(fn, "refused_base_args", frozenset())
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    accepts_any = True
    for init in inits:
        sig = inspect.signature(init)
        for name, p in sig.parameters.items():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self" and name not in refused:
                params.setdefault(name, p)
        hints = {**_type_hints(init), **hints}
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            accepts_any = False
            break
    return params, hints, accepts_any


def validate_target_group(group: str, section: DictConfig) -> None:
    """Check ``section``'s keys and value types against its ``_target_`` callable's signature."""
    fn = resolve_target(group, section)
    injected = TARGET_GROUPS.get(group, ())
    all_params, hints, accepts_any = target_parameters(fn)
    params = {name: p for name, p in all_params.items() if name not in injected}
    for key in section:
        if key in RESERVED_KEYS:
            params.pop(key, None)  # reserved keys are always allowed and validated as part of the group
            continue
        if key in injected:
            raise ConfigError(f"{group}.{key} is set by the runner; remove it from the {group} config")
        if key not in params and not accepts_any:
            raise ConfigError(unknown_key_message(group, key, section, sorted(params)))
    for name, p in params.items():
        present = name in section.keys()
        if (present and OmegaConf.is_missing(section, name)) or (not present and p.default is p.empty):
            raise ConfigError(
                f"{group}.{name} must be set ({section._target_} needs it): "
                f"add {group}.{name}=VALUE to the command line"
            )
        if not present:
            continue
        value = section[name]
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        hint = hints.get(name, inspect.Parameter.empty)
        if not _type_matches(value, hint):
            raise ConfigError(f"{group}.{name}={value!r} has the wrong type: expected {_hint_name(hint)}")


def options_with_key(group: str, key: str) -> list[str]:
    """The shipped options of ``group`` whose config file has ``key``."""
    return sorted(name for name, keys in _group_keys(group).items() if key in keys)


@functools.lru_cache(maxsize=8)
def _group_keys(group: str) -> dict[str, frozenset[str]]:
    folder = CONF_DIR / group
    return {p.stem: frozenset(OmegaConf.load(p).keys()) for p in sorted(folder.glob("*.yaml"))}  # type: ignore[misc]


def unknown_key_message(group: str, key: str, section: DictConfig, valid: list[str]) -> str:
    """Why ``group.key`` is not accepted: the options that have it, or the close matches of a misspelling."""
    name = section.get("name", section._target_)
    owners = options_with_key(group, key)
    if owners:
        message = (
            f"{group}.{key} is not a setting of {group}={name}; the {group} options that have it: "
            f"{', '.join(owners)}. Set it only where it applies (e.g. one sweep per {group})"
        )
        if group == "method" and key in BudgetConfig.__dataclass_fields__:
            message += f", or set budget.{key}=VALUE: the training budget of every method that has the key"
        return message + "."
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {' or '.join(f'{group}.{c}' for c in close)}?" if close else ""
    return (
        f"unknown key {group}.{key} for {section._target_}; valid keys: {', '.join(valid) or '(none)'}."
        f"{hint} "
        "Check the spelling in the config file or on the command line."
    )


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_schema_keys(cfg: DictConfig) -> None:
    """Reject keys added with ``+`` to schema groups or the top level (Hydra lets ``+key=`` through)."""
    top_level = {f.name: f for f in fields(RunConfig)}
    for key in cfg:
        if key not in top_level:
            raise ConfigError(f"unknown top-level key {key!r}; valid keys: {', '.join(sorted(top_level))}")
    for key, f in top_level.items():
        schema = f.default_factory if f.default_factory is not MISSING_FACTORY else None
        if schema is None or not is_dataclass(schema) or key not in cfg:
            continue
        valid = {sf.name for sf in fields(schema)}
        unknown = sorted(set(cfg[key]) - valid)
        if unknown:
            raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: {', '.join(sorted(valid))}")


def validate_config(cfg: DictConfig) -> None:
    """Validate the target groups, the method's fit to the backbone (:mod:`cl_bench.compatibility`) and
    cross-field rules before any compute (schema groups are typed)."""
    from cl_bench.compatibility import check_method_fits_backbone, check_method_fits_scenario, method_settings

    _check_schema_keys(cfg)
    for group in TARGET_GROUPS:
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            raise ConfigError(f"no {group} selected: add {group}=NAME (see conf/{group}/ for the options)")
        validate_target_group(group, cfg[group])
    method_cls = resolve_target("method", cfg.method)
    check_method_fits_backbone(cfg, method_cls, method_settings(cfg.method, target_parameters(method_cls)[0]))
    sc = cfg.scenario
    check_method_fits_scenario(cfg, method_cls)
    if sc.type == ScenarioType.dil:
        if sc.init_classes is not None or sc.increment is not None:
            raise ConfigError(
                "scenario=dil: every task holds all classes, so scenario.init_classes and scenario.increment "
                "must be null (the tasks are scenario.domains)"
            )
    elif sc.domains is not None:
        raise ConfigError(
            f"scenario.domains is for scenario=dil (now scenario={sc.type}); to use some domains of a "
            "dataset in class-incremental tasks set dataset.domains"
        )
    elif sc.n_tasks is None and sc.init_classes is None:
        raise ConfigError("scenario: set scenario.n_tasks, or scenario.init_classes (and scenario.increment)")
    for key in ("n_tasks", "init_classes", "increment"):
        if sc[key] is not None and sc[key] < 1:
            raise ConfigError(f"scenario.{key}={sc[key]} must be at least 1")
    if sc.order_seed is not None and not 0 <= sc.order_seed < 2**32:
        raise ConfigError(f"scenario.order_seed={sc.order_seed} must lie in [0, 2**32) (or be null)")
    if cfg.trainer.num_workers < 0:
        raise ConfigError("trainer.num_workers must be >= 0")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must lie in [0, 2**32) (numpy's and Lightning's seed range)")
    _check_devices(cfg.trainer)


def _check_devices(trainer: DictConfig) -> None:
    """``trainer.devices``, ``num_nodes`` and ``precision`` as Lightning accepts them, named before the first
    fit (Lightning would only refuse them once the run has started)."""
    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT

    devices = trainer.devices
    if isinstance(devices, ListConfig):
        devices = list(devices)
    elif isinstance(devices, str) and devices != "auto":  # Lightning also takes "2" and "0,1"
        try:
            devices = [int(p) for p in devices.split(",") if p.strip()] if "," in devices else int(devices)
        except ValueError:
            devices = None
    valid = (
        devices == "auto"
        or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (
            isinstance(devices, list)
            and bool(devices)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
        )
    )
    if not valid:
        raise ConfigError(
            f"trainer.devices={trainer.devices!r}: give a number of devices >= 1, -1 (all), a list of device "
            "indices (e.g. [0,1]) or auto"
        )
    if trainer.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={trainer.num_nodes} must be at least 1")
    precisions = [str(p) for arg in typing.get_args(_PRECISION_INPUT) for p in typing.get_args(arg)]
    if str(trainer.precision) not in precisions:
        raise ConfigError(
            f"trainer.precision={trainer.precision!r}: use one of {', '.join(precisions)} "
            "(32-true: full precision; bf16-mixed on a GPU)"
        )


def build_from_config(group: str, section: DictConfig, **injected: Any) -> Any:
    """Call the ``_target_`` of a validated target group with its keys plus runner-provided arguments."""
    fn = resolve_target(group, section)
    return fn(**target_kwargs(fn, section), **injected)
