"""Pre-train (or fine-tune) a backbone on a dataset or a subset of its classes; save a loadable checkpoint.

The backbone, dataset, transforms and trainer come from the same Hydra config groups as ``cl-bench``; the
classes are the first ``--classes`` of the class order (``scenario.order_seed``), e.g. the 50 base classes
of a B50 protocol. Training is plain supervised cross-entropy (the ``joint`` method on one task of those
classes). Writes ``OUT.pth`` (the backbone's weights in the layout ``backbone.checkpoint=OUT.pth`` loads)
and ``OUT.json`` (test accuracy on those classes, classes used, the command and the config).

A small ViT for machines that cannot download weights (first 50 CIFAR-100 classes, 32 px, patch 4):

    .venv/bin/python scripts/pretrain.py --out checkpoints/vit_tiny_c100first50 --classes 50 -- \
        dataset=npz dataset.path=../shared/data/cifar100.npz backbone=timm \
        backbone.name=vit_tiny_patch16_224 backbone.pretrained=false \
        'backbone.model_kwargs={img_size:32,patch_size:4}' method=joint method.epochs=100 \
        method.optimizer=adamw method.lr=0.001 method.weight_decay=0.05 method.batch_size=128
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cl_bench.config  # noqa: F401  (registers the schemas)
from cl_bench.config import ScenarioType, build_from_config, validate_config
from cl_bench.data.transforms import build_transforms
from cl_bench.devices import select_device
from cl_bench.evaluation import Evaluator
from cl_bench.experiment import task_datasets
from cl_bench.learning import learn_task
from cl_bench.methods.base import TaskContext
from cl_bench.scenario import Scenario, Task, class_order

CONF_DIR = Path(__file__).resolve().parent.parent / "cl_bench" / "conf"


def pretrain(overrides: list[str], n_classes: int | None, out: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.run_dir={out.parent}", "logger.mode=disabled"])
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_from_config("dataset", cfg.dataset)
    backbone = build_from_config("backbone", cfg.backbone)
    method = build_from_config("method", cfg.method, backbone=backbone)
    order = class_order(data.num_classes, cfg.scenario.order_seed, cfg.scenario.class_order)
    chosen = order[: n_classes or data.num_classes]
    task = Task(0, 0, len(chosen), tuple(chosen))
    scenario = Scenario(ScenarioType(cfg.scenario.type), tuple(order), (task,))
    train_tf, eval_tf = build_transforms(backbone.data_config, cfg.transform, data.hflip_invariant)
    train_sets, train_eval_sets, test_sets = task_datasets(data, scenario, train_tf, eval_tf)
    ctx = TaskContext(
        task,
        scenario,
        train_sets[0],
        train_eval_sets[0],
        cfg.trainer.num_workers,
        cfg.trainer.eval_batch_size,
        cfg.seed,
    )
    device = select_device(cfg.trainer.accelerator)
    start = time.perf_counter()
    learn_task(method, ctx, OmegaConf.to_object(cfg.trainer), device, out.parent, lambda _: None)
    accuracy = Evaluator(scenario, test_sets, cfg.trainer.eval_batch_size).evaluate(method, 0)[0][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.weights_state_dict(), out.with_suffix(".pth"))
    report = {
        "test_accuracy": accuracy,
        "classes": [int(c) for c in chosen],
        "train_images": len(train_sets[0]),
        "test_images": len(test_sets[0]),
        "train_time_s": time.perf_counter() - start,
        "command": shlex.join(["python", "scripts/pretrain.py", *sys.argv[1:]]),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.pth and OUT.json")
    parser.add_argument("--classes", type=int, default=None, help="train on the first N classes of the order")
    parser.add_argument("overrides", nargs="*", help="cl-bench overrides (after --)")
    args = parser.parse_args()
    report = pretrain(args.overrides or ["method=joint"], args.classes, args.out)
    print(
        f"test accuracy on {len(report['classes'])} classes: {report['test_accuracy']:.2f}% -> {args.out}.pth"
    )


if __name__ == "__main__":
    main()
