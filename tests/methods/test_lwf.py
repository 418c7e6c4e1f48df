"""LwF: the distillation term is the temperature-scaled KL of its formula (zero when the student is the
teacher), the loss is CE + alpha * KD over the old classes (one softmax in CIL, one per old task in TIL), the
teacher is a frozen snapshot outside the module, the warm-up (on by default, ``epochs`` long) trains only
the new block, the teacher's logits are recorded on the un-augmented images by default (or computed on the
augmented batch), and on a real run it keeps more of the first task than seq_ft.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyBackbone, ToyTasks, fit_phase
from torch.utils.data import TensorDataset

from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.lwf import LwF, distillation

SIZES = (2, 2, 2)
TOY = ToyTasks(SIZES, n_per_class=4, input_shape=(4,))


def _module(**kwargs) -> LwF:
    torch.manual_seed(0)
    return LwF(TinyBackbone(), batch_size=4, **kwargs)


def _advance(module: LwF, task: int, til: bool = False) -> TaskContext:
    """Start ``task`` after moving every weight a little (so that student and teacher differ)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ctx = TOY.context(task, til)
    module.on_task_start(ctx)
    return ctx


def test_distillation_is_the_temperature_scaled_kl() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    t = 2.0
    p_teacher = torch.softmax(teacher / t, dim=1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, dim=1))).sum(1).mean()
    torch.testing.assert_close(distillation(student, teacher, t), expected)
    assert distillation(student, teacher, t) > 0
    for temperature in (0.5, 2.0, 4.0):
        assert distillation(teacher, teacher, temperature).abs().item() < 1e-6


def test_teacher_is_a_frozen_snapshot_of_the_old_classes_outside_the_module() -> None:
    module = _module()
    module.on_task_start(TOY.context(0))
    assert module.teacher is None
    _advance(module, 1)
    teacher = module.teacher
    assert teacher is not None and not teacher.training
    x = TOY.context(1).train_set.tensors[0]
    assert teacher(x).shape == (8, 2) and module(x).shape == (8, 4)
    torch.testing.assert_close(teacher(x), module(x)[:, :2])  # a copy of the model at the task start
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k for k in module.state_dict())
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    module.train()
    assert not teacher.training
    with torch.no_grad():
        module.backbone.fc.weight.add_(1.0)
    assert not torch.allclose(teacher(x), module(x)[:, :2])


def test_class_incremental_loss_is_ce_plus_alpha_kd_over_all_old_classes() -> None:
    module = _module(alpha=0.7, temperature=3.0)
    module.on_task_start(TOY.context(0))
    _advance(module, 1)
    ctx = _advance(module, 2)
    x, y = ctx.train_set.tensors
    assert module.teacher is not None
    logits, old = module(x), module.teacher(x)
    assert old.shape[1] == 4
    ce = F.cross_entropy(logits, y)  # over all 6 seen classes
    expected = ce + 0.7 * distillation(logits[:, :4], old, 3.0)
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, expected)


def test_task_incremental_distils_each_old_task_separately() -> None:
    module = _module(alpha=0.5)
    module.on_task_start(TOY.context(0, til=True))
    _advance(module, 1, til=True)
    ctx = _advance(module, 2, til=True)
    x, y = ctx.train_set.tensors
    assert module.teacher is not None
    logits, old = module(x), module.teacher(x)
    ce = F.cross_entropy(logits[:, 4:6], y - 4)
    kd = distillation(logits[:, 0:2], old[:, 0:2], 2.0) + distillation(logits[:, 2:4], old[:, 2:4], 2.0)
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, ce + 0.5 * kd)
    assert not torch.allclose(kd, distillation(logits[:, :4], old, 2.0))  # differs from one joint softmax


def test_warm_up_trains_only_the_new_block() -> None:
    module = _module(warmup_epochs=20, lr=0.5)
    module.on_task_start(TOY.context(0))
    ctx = TOY.context(1)
    module.on_task_start(ctx)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    warmup, train = module.phases(ctx)
    assert (warmup.name, warmup.epochs, train.name) == ("warmup", 20, "train")
    assert warmup.head_training is not None and warmup.head_training.head is module.head.blocks[-1]
    fit_phase(module, warmup, ctx)
    after = dict(module.named_parameters())
    for name in ("head.blocks.1.weight", "head.blocks.1.bias"):
        assert not torch.equal(after[name], before.pop(name)), f"{name} did not train"
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed during the warm-up"
    x, y = ctx.train_set.tensors
    fresh = _module()
    fresh.on_task_start(TOY.context(0))
    fresh.on_task_start(ctx)  # same seed: the same new block before any warm-up
    new_block_ce = F.cross_entropy(module(x)[:, 2:], y - 2)
    assert new_block_ce < F.cross_entropy(fresh(x)[:, 2:], y - 2)


def test_warm_up_is_on_by_default_for_as_many_epochs_as_training() -> None:
    module = _module(epochs=3)
    ctx = TOY.context(0)
    module.on_task_start(ctx)
    assert [p.name for p in module.phases(ctx)] == ["train"]  # nothing to warm up on the first task
    ctx = TOY.context(1)
    module.on_task_start(ctx)
    assert [(p.name, p.epochs) for p in module.phases(ctx)] == [("warmup", 3), ("train", 3)]
    module = _module(epochs=3, warmup_epochs=0)
    module.on_task_start(TOY.context(0))
    module.on_task_start(ctx)
    assert [p.name for p in module.phases(ctx)] == ["train"]


def test_unaugmented_teacher_logits_are_recorded_on_the_eval_images() -> None:
    module = _module(alpha=0.5)
    module.on_task_start(TOY.context(0))
    ctx = _advance(module, 1)
    x, y = ctx.train_set.tensors
    augmented = TensorDataset(x + 0.5 * torch.randn_like(x), y)  # stands in for the train transform
    ctx.train_set = augmented
    assert module.teacher is not None
    data = module.train_dataset(ctx)
    assert len(data) == len(x)
    x_aug, y_0, recorded = data[0]
    torch.testing.assert_close(recorded, module.teacher(x[:1])[0])  # the eval-transform image's logits
    assert torch.equal(x_aug, augmented[0][0]) and y_0 == y[0]
    batch = (augmented.tensors[0], y, torch.stack([data[i][2] for i in range(len(data))]))
    logits = module(batch[0])
    expected = F.cross_entropy(logits, y) + 0.5 * distillation(logits[:, :2], module.teacher(x), 2.0)
    with pytest.warns(UserWarning, match="self.log"):
        torch.testing.assert_close(module.training_step(batch, 0), expected)


def test_augmented_teacher_inputs_run_the_teacher_on_the_training_batch() -> None:
    module = _module(teacher_inputs="augmented")
    module.on_task_start(TOY.context(0))
    ctx = _advance(module, 1)
    assert module.train_dataset(ctx) is ctx.train_set
    train = module.phases(ctx)[-1]
    assert train.data is ctx.train_set


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"warmup_epochs": -1}, "warmup"),
        ({"teacher_inputs": "raw"}, "teacher_inputs"),
    ],
)
def test_invalid_arguments_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LwF(TinyBackbone(), **kwargs)


def test_lwf_on_real_digits_forgets_less_than_seq_ft_given_the_task(run_tiny) -> None:
    # 3 epochs: after 1 the first task is barely learned and the gap is within seed noise (seeds 1-3 of the
    # old 1-epoch setting: LwF 20-26 % vs seq_ft 14-29 %); at 3, LwF keeps 42-43 % vs 31-35 % (seeds 0, 1).
    common = ("method.epochs=3", "method.batch_size=16", "method.lr=0.02")
    doc, _ = run_tiny("method=lwf", *common)
    baseline, _ = run_tiny("method=seq_ft", *common)
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    # Task-aware accuracy on the first task after the second: the features it needs survive distillation.
    # Without task ids both lose it to the new head's bias.
    assert doc["til_acc_matrix"][1][0] > baseline["til_acc_matrix"][1][0] + 5.0
