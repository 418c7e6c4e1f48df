"""SimpleCIL: prototypes are class means of frozen features; predictions are the nearest cosine prototype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench.backbones.base import DataConfig
from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.data.digits import load_digits
from cl_bench.data.transforms import eval_transform


def _features(backbone: CifarResNet, images: np.ndarray) -> np.ndarray:
    tf = eval_transform(DataConfig(input_size=16))
    x = torch.stack(
        [
            tf(torch.from_numpy(np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im).permute(2, 0, 1))
            for im in images
        ]
    )
    with torch.no_grad():
        return backbone.eval()(x).numpy().astype(np.float64)


def test_simplecil_matches_a_numpy_nearest_prototype_reference(run_tiny) -> None:
    doc, run_dir = run_tiny("method=simplecil", "save_model=true")
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    backbone = CifarResNet(20)
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    )

    data = load_digits(size=16)
    order = doc["class_order"]
    position = np.argsort(order)
    train_f = _features(backbone, data.train.images)
    test_f = _features(backbone, data.test.images)
    protos = np.stack([train_f[data.train.labels == c].mean(0) for c in order])  # row i = class at position i
    np.testing.assert_allclose(state["state_dict"]["head.prototypes"].numpy(), protos, rtol=1e-4, atol=1e-5)

    def normalise(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    test_pos = position[data.test.labels]
    for t in range(2):
        seen = (t + 1) * 5
        pred = (normalise(test_f) @ normalise(protos[:seen]).T).argmax(1)
        for j in range(t + 1):
            mask = (test_pos >= 5 * j) & (test_pos < 5 * (j + 1))
            expected = 100.0 * np.mean(pred[mask] == test_pos[mask])
            assert doc["acc_matrix"][t][j] == pytest.approx(expected, abs=1e-9)


def test_simplecil_trains_nothing_and_keeps_backbone(run_tiny) -> None:
    doc, run_dir = run_tiny("method=simplecil", "save_model=true", "scenario.n_tasks=5")
    state = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    # BN running statistics are untouched by feature extraction (backbone stays in eval mode).
    assert torch.equal(state["backbone.bn1.running_mean"], torch.zeros(16))
    assert torch.equal(state["backbone.bn1.running_var"], torch.ones(16))
    assert state["head.prototypes"].shape == (10, 64)
    # Real (if random-feature) digits: well above the 10 % chance level after all tasks.
    assert doc["last_acc"] > 40.0
