"""SAFE under scenario=dil, as the DIL branch of its code (trainer.py resets the session counter per
domain): session 1 on the first domain only, later domains only refit both ridge heads into the shared G/Q
(each domain's features added twice, fast then slow), the fast learner predicts alone;
``domain_sessions=train_fast`` trains and aggregates instead, its cross-classification against every class's
slow prototype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import task_context
from torch.utils.data import TensorDataset

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.config import ScenarioConfig, ScenarioType
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.safe import SAFE, aggregate
from cl_bench.modules.peft import peft_parameters
from cl_bench.scenario import build_scenario

CLASSES = 3
SCENARIO = build_scenario(
    ScenarioConfig(type=ScenarioType.dil, n_tasks=None, order_seed=None, domains=["real", "sketch"]),
    CLASSES,
    ["real", "sketch"],
)


def _ctx(task: int) -> TaskContext:
    g = torch.Generator().manual_seed(task)
    shift = 1.0 if task == 0 else -1.0  # another domain: the same classes, other images
    data = TensorDataset(shift + torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % CLASSES)
    return task_context(SCENARIO, task, data)


def _safe(**kwargs) -> SAFE:
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 8, "patch_size": 4, "depth": 1}
    )
    return SAFE(backbone, rp_dim=32, adapter_bottleneck=4, **kwargs)


def _session_one(module: SAFE) -> TaskContext:
    ctx = _ctx(0)
    module.on_task_start(ctx)
    module.train()
    optimizer = torch.optim.SGD([p for g in module.param_groups() for p in g["params"]], lr=0.5)
    x, y = ctx.train_set.tensors
    for _ in range(2):
        with pytest.warns(UserWarning, match="self.log"):
            loss = module.training_step((x, y), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.on_task_end(ctx)
    return ctx


def _projected(module: SAFE, ctx: TaskContext) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return torch.relu(module.backbone(ctx.train_eval_set.tensors[0]) @ module.head.projection)


def test_later_domains_only_refit_the_ridge_heads_into_the_shared_statistics() -> None:
    module = _safe()
    assert [p.epochs for p in module.phases(_ctx(0))] == [20]
    ctx0 = _session_one(module)
    assert module.cosine_head.num_classes == CLASSES and module.head.num_classes == CLASSES
    assert module.cosine_head.sigma.item() == 10.0 == module.slow_cosine.sigma.item()  # reset as setup_RP
    peft_before = [p.detach().clone() for p in peft_parameters(module.backbone)]
    ctx1 = _ctx(1)
    module.on_task_start(ctx1)
    assert module.cosine_head.num_classes == CLASSES and module.head.num_classes == CLASSES  # no growth
    assert not any(p.trains for p in module.phases(ctx1))  # no training after the first domain
    module.on_task_end(ctx1)
    assert all(torch.equal(a, b) for a, b in zip(peft_before, peft_parameters(module.backbone), strict=True))
    # G/Q: every domain's projected features, added by the fast and again by the slow head (fast == slow)
    h0, h1 = _projected(module, ctx0), _projected(module, ctx1)
    y = F.one_hot(torch.arange(12) % CLASSES, CLASSES).float()
    torch.testing.assert_close(module.head.gram, 2 * (h0.T @ h0 + h1.T @ h1), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(module.head.cross, 2 * (h0.T @ y + h1.T @ y), rtol=1e-4, atol=1e-3)
    assert module.slow_head.gram.numel() == 0  # the statistics live in the fast head (ridge_stats=shared)


def test_the_fast_learner_predicts_alone_at_every_domain() -> None:
    module = _safe()
    _session_one(module)
    ctx1 = _ctx(1)
    module.on_task_start(ctx1)
    module.on_task_end(ctx1)
    module.eval()
    x = ctx1.train_set.tensors[0]
    fast, slow = module.learner_logits(x)
    assert slow is not None and not torch.equal(fast, slow)  # the slow head solved after one more addition
    prediction = module.predict(x)
    assert torch.equal(prediction.logits, fast) and set(prediction.alternatives) == {"fast", "slow"}


def test_train_fast_trains_later_domains_and_aggregates() -> None:
    module = _safe(domain_sessions="train_fast", align_weight=0.7, cross_weight=0.3)
    _session_one(module)
    ctx1 = _ctx(1)
    module.on_task_start(ctx1)
    assert [p.epochs for p in module.phases(ctx1)] == [15]
    module.eval()  # no dropout: the two fast passes agree
    x, y = ctx1.train_set.tensors
    with torch.no_grad():
        for p in peft_parameters(module.backbone):
            p.add_(0.1 * torch.randn_like(p))
    fast, slow = module.backbone(x), module.slow_backbone(x)
    targets = torch.cat([torch.arange(CLASSES), y])  # every class is old: all slow prototypes take part
    s2f = F.cross_entropy(module.cosine_head(torch.cat([module.slow_cosine.weight, slow])), targets)
    f2s = F.cross_entropy(module.slow_cosine(torch.cat([module.cosine_head.weight, fast])), targets)
    torch.testing.assert_close(module.cross_classification(fast, slow, y), s2f + f2s)
    module.on_task_end(ctx1)
    module.eval()
    fast_logits, slow_logits = module.learner_logits(x)
    torch.testing.assert_close(module(x), aggregate(fast_logits, slow_logits, "entropy", module.gamma))


def test_domain_sessions_is_checked() -> None:
    with pytest.raises(ConfigError, match="domain_sessions"):
        _safe(domain_sessions="retrain")
