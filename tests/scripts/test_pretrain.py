"""scripts/pretrain.py: the checkpoint it writes loads back through ``backbone.checkpoint=``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from helpers import REPO_ROOT

from cl_bench.backbones.timm_backbone import TimmBackbone

spec = importlib.util.spec_from_file_location("pretrain", REPO_ROOT / "scripts" / "pretrain.py")
pretrain_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain_script)


def test_pretrain_a_small_vit_on_some_classes_and_load_it_back(tmp_path: Path, run_tiny) -> None:
    overrides = [
        "dataset=digits",
        "dataset.size=16",
        "transform.input_size=16",
        "trainer.accelerator=cpu",
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.pretrained=false",
        "backbone.model_kwargs={img_size:16,patch_size:4,depth:1,embed_dim:64,num_heads:2}",
        "method=joint",
        "method.epochs=15",
        "method.optimizer=adamw",
        "method.lr=0.001",
        "method.weight_decay=0.0",
        "method.batch_size=32",
    ]
    out = tmp_path / "ckpt" / "vit_digits_first4"
    report = pretrain_script.pretrain(overrides, 4, out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["classes"] == report["classes"] and len(saved["classes"]) == 4
    assert saved["train_images"] < 1437 * 0.5 and saved["test_accuracy"] > 40.0  # 4 classes: chance 25 %
    state = torch.load(out.with_suffix(".pth"), weights_only=True)
    loaded = TimmBackbone(
        "vit_tiny_patch16_224",
        checkpoint=str(out.with_suffix(".pth")),
        model_kwargs={"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 64, "num_heads": 2},
    )
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    doc, _ = run_tiny(
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        f"backbone.checkpoint={out.with_suffix('.pth')}",
        "backbone.model_kwargs={img_size:16,patch_size:4,depth:1,embed_dim:64,num_heads:2}",
        "method=simplecil",
    )
    assert doc["status"] == "complete"
