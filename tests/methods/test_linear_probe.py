"""Linear probe: frozen backbone, features computed once per task, only the head trains."""

from __future__ import annotations

import torch

from cl_bench.backbones.cifar_resnet import CifarResNet


def test_backbone_runs_once_per_image_and_stays_frozen(run_tiny, monkeypatch) -> None:
    calls = {"images": 0}
    original = CifarResNet.forward

    def counting_forward(self: CifarResNet, x: torch.Tensor) -> torch.Tensor:
        calls["images"] += len(x)
        return original(self, x)

    monkeypatch.setattr(CifarResNet, "forward", counting_forward)
    doc, run_dir = run_tiny("method=linear_probe", "method.epochs=30", "method.lr=0.5", "save_model=true")
    from cl_bench.data.digits import load_digits

    data = load_digits(size=16)
    # One pass over the training images (task start) and one over the test images (first evaluation),
    # however many epochs and evaluations there are.
    assert calls["images"] == len(data.train) + len(data.test)
    state = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    assert torch.equal(state["backbone.bn1.running_mean"], torch.zeros(16))
    assert doc["acc_matrix"][0][0] > 40.0


def test_only_the_head_is_trainable() -> None:
    from cl_bench.methods.linear_probe import LinearProbe

    module = LinearProbe(CifarResNet(20))
    module.head.add_task(5)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["head.blocks.0.weight", "head.blocks.0.bias"]
    module.train()
    assert not module.backbone.training and module.head.training
