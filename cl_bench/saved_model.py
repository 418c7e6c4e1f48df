"""``final_model.pt``: the final method state of a run, and :func:`load_model` to predict with it.

The file holds tensors and plain data only (``torch.load(path, weights_only=True)`` reads it): the method's
``state_dict``, the structure it grew during the run, every parameter's ``requires_grad`` and every
submodule's mode (:meth:`~cl_bench.methods.base.ContinualModule.method_state` with ``training=False``), the
class order and task boundaries, the method's ``_target_`` and the backbone config. :func:`load_model`
builds the method from the run's ``config.yaml`` exactly as the run did (the backbone without downloading
or reading pre-trained weights: they are all in the file) and restores that state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from cl_bench.errors import CheckpointError
from cl_bench.storage import read_small_text, write_atomic

MODEL_FILE = "final_model.pt"
MODEL_FORMAT = "cl_bench.model/1"


def save_model(
    path: Path, method: Any, class_order: list[int], task_boundaries: list[list[int]], config: dict[str, Any]
) -> None:
    """Write ``final_model.pt`` atomically (retried once; :class:`~cl_bench.errors.StorageError` after)."""
    state = method.method_state(training=False)
    payload = {
        "format": MODEL_FORMAT,
        "state_dict": state["state_dict"],
        "structure": state["structure"],
        "requires_grad": state["requires_grad"],
        "training": state["training"],
        "class_order": [int(c) for c in class_order],
        "task_boundaries": task_boundaries,
        "method": config["method"].get("_target_"),
        "backbone": config["backbone"],
    }
    write_atomic(Path(path), lambda fh: torch.save(payload, fh))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """The method of the run in ``run_dir`` with its final state, in eval mode on ``device``.

    ``model(x)`` gives logits over every class seen, in class-order positions (``model.class_order[k]`` is
    the dataset class id of position ``k``); ``model.predict(x)`` also the chosen task where the method
    chooses one.
    """
    from cl_bench.config import build_from_config

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run did not finish, or ran with save_model=false")
    try:
        config = yaml.safe_load(read_small_text(run_dir / "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # ValueError: not UTF-8
        raise CheckpointError(
            f"cannot read {run_dir / 'config.yaml'} ({exc}); load_model needs the run's config"
        ) from exc
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read as tensors and plain data ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a {MODEL_FORMAT} file (written by another cl_bench version?)")
    parts = ("method", "backbone")
    if not (isinstance(config, dict) and all(isinstance(config.get(k), dict) for k in parts)):
        raise CheckpointError(f"{run_dir / 'config.yaml'} is not a run's config (no method and backbone)")
    backbone_cfg = dict(config["backbone"])
    for key, offline in (("pretrained", False), ("checkpoint", None)):
        if key in backbone_cfg:
            backbone_cfg[key] = offline  # every weight comes from the file
    backbone = build_from_config("backbone", OmegaConf.create(backbone_cfg))
    method = build_from_config("method", OmegaConf.create(config["method"]), backbone=backbone)
    try:
        method.load_method_state(
            {k: saved[k] for k in ("structure", "state_dict", "requires_grad", "training")}
        )
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path} does not fit the method built from the run's config ({exc})") from exc
    method.class_order = list(saved["class_order"])
    method.task_boundaries = [list(b) for b in saved["task_boundaries"]]
    return method.to(device).eval()
