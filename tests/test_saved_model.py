"""``final_model.pt`` and ``cl_bench.load_model``: a model rebuilt from a run folder alone predicts exactly
what the run evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_VIT_RUN
from omegaconf import OmegaConf

import cl_bench
from cl_bench.config import build_from_config
from cl_bench.data.transforms import build_transforms
from cl_bench.errors import CheckpointError
from cl_bench.evaluation import Evaluator
from cl_bench.experiment import task_datasets
from cl_bench.scenario import build_scenario

METHODS = {
    "seq_ft": ("method=seq_ft", "method.epochs=1"),
    "simplecil": ("method=simplecil",),
    "confit": ("method=confit", "scenario=til", "method.epochs=1"),
    "input_tuning": ("method=input_tuning", "method.sharing=per_task", "method.epochs=1"),
    "ranpac": ("method=ranpac", *TINY_VIT_RUN, "method.adapter_bottleneck=4", "method.rp_dim=16"),
    "lnt": ("method=lnt", *TINY_VIT_RUN, "method.rectification_epochs=1"),
}


def evaluate_saved(run_dir: Path, model: torch.nn.Module):
    """The evaluator's last rows for ``model`` on the run's test sets, built from its config.yaml."""
    cfg = OmegaConf.create(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = build_from_config("dataset", cfg.dataset)
    scenario = build_scenario(cfg.scenario, data.num_classes)
    _, eval_tf = build_transforms(model.backbone.data_config, cfg.transform, data.hflip_invariant)
    _, _, test_sets = task_datasets(data, scenario, eval_tf, eval_tf)
    evaluator = Evaluator(scenario, test_sets, batch_size=64)
    return evaluator.evaluate_rows(model, len(scenario.tasks) - 1)


@pytest.mark.parametrize("method", list(METHODS))
def test_load_model_predicts_what_the_run_evaluated(run_tiny, method: str) -> None:
    doc, run_dir = run_tiny(*METHODS[method], "save_model=true")
    model = cl_bench.load_model(run_dir)
    assert not model.training and model.class_order == doc["class_order"]
    rows = evaluate_saved(run_dir, model)
    last = rows.til if doc["config"]["scenario"]["type"] == "til" else rows.cil
    assert last == doc["acc_matrix"][-1]
    assert rows.til == doc["til_acc_matrix"][-1]
    saved = torch.load(run_dir / "final_model.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, saved["state_dict"][name]), name


def test_load_model_explains_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="final_model.pt does not exist"):
        cl_bench.load_model(tmp_path)
    (tmp_path / "config.yaml").write_text("{}")
    torch.save({"weights": torch.ones(1)}, tmp_path / "final_model.pt")
    with pytest.raises(CheckpointError, match="is not a cl_bench.model/1 file"):
        cl_bench.load_model(tmp_path)
    # a damaged config.yaml used to raise UnicodeDecodeError / TypeError
    (tmp_path / "config.yaml").write_bytes(b"method: caf\xe9")
    with pytest.raises(CheckpointError, match="cannot read .*config.yaml .*can't decode"):
        cl_bench.load_model(tmp_path)
    (tmp_path / "config.yaml").write_text("[1, 2]")
    torch.save({"format": "cl_bench.model/1"}, tmp_path / "final_model.pt")
    with pytest.raises(CheckpointError, match="config.yaml is not a run's config"):
        cl_bench.load_model(tmp_path)
