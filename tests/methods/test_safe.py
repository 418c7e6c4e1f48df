"""SAFE: the transfer loss of its code (minimal at matching features for orthonormal PTM features), the
entropy aggregation weights, the cross-classification loss, the slow learner frozen after session 1 while the
fast one trains, and a tiny run that reports the aggregate with the fast and slow learners beside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ToyTasks

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.safe import SAFE, aggregate, aggregation_weights, entropy, transfer_loss
from cl_bench.modules.peft import peft_parameters

SIZES = (3, 3)
TOY = ToyTasks(SIZES, n_per_class=4, input_shape=(3, 8, 8))
#: A one-block 192-d ViT on 8 px digits, one epoch per session: a SAFE run in about 30 s on 2 busy cores.
TINY_VIT = (
    "dataset.size=8",
    "transform.input_size=8",
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size:8,patch_size:4,depth:1}",
    "method.epochs=1",
    "method.batch_size=128",
    "method.adapter_bottleneck=8",
)


def test_transfer_loss_is_the_weighted_correlation_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    c = F.normalize(s, dim=1).T @ F.normalize(t, dim=1) / 6
    on = sum((c[i, i] - 1) ** 2 for i in range(4))
    off = sum(c[i, j] ** 2 for i in range(4) for j in range(4) if i != j)
    torch.testing.assert_close(transfer_loss(s, t, 0.3, 2.0), 0.3 * on + 2.0 * off)


def test_transfer_loss_is_minimal_when_features_match_orthonormal_ptm_features() -> None:
    """With B = D orthonormal PTM features the loss's global minimum is exactly s = t (the code's loss is
    not minimal at s = t for arbitrary PTM features: its diagonal term weights dimensions by 1 - c_ii)."""
    pretrained = torch.eye(5)
    matched = transfer_loss(pretrained, pretrained, 1.0, 1.0)
    torch.testing.assert_close(matched, torch.tensor(5 * (1 / 5 - 1) ** 2))
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        other = pretrained + scale * torch.randn(5, 5, generator=g)
        assert transfer_loss(other, pretrained, 1.0, 1.0) > matched
    assert transfer_loss(pretrained, pretrained, 0.0, 0.0) == 0


def test_aggregation_weights_follow_the_entropy_formula_and_sum_to_one() -> None:
    g = torch.Generator().manual_seed(2)
    fast, slow = 3 * torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    p = torch.softmax(fast, dim=1)
    torch.testing.assert_close(entropy(fast), -(p * torch.log(p + 1e-9)).sum(1))
    for gamma in (0.0, 1.0, 100.0):
        w = aggregation_weights(fast, slow, gamma)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(7))
        h = torch.stack([entropy(fast), entropy(slow)], 1)
        e = torch.exp(-gamma * (h - h.min(dim=1, keepdim=True).values))  # shifted: no underflow at gamma 100
        torch.testing.assert_close(w, e / e.sum(1, keepdim=True))
    w = aggregation_weights(fast, slow, 1.0)
    assert torch.equal(w[:, 0] > w[:, 1], entropy(fast) < entropy(slow))  # the more confident learner wins
    torch.testing.assert_close(aggregate(fast, slow, "entropy", 1.0), w[:, :1] * fast + w[:, 1:] * slow)
    torch.testing.assert_close(aggregate(fast, slow, "max", 1.0), torch.maximum(fast, slow))
    assert torch.equal(aggregate(fast, slow, "fast", 1.0), fast)


def _safe(**kwargs) -> SAFE:
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 8, "patch_size": 4, "depth": 1}
    )
    return SAFE(backbone, rp_dim=32, adapter_bottleneck=4, **kwargs)


def _sgd_steps(module: SAFE, ctx: TaskContext, steps: int = 2) -> None:
    module.train()
    optimizer = torch.optim.SGD([p for g in module.param_groups() for p in g["params"]], lr=0.5)
    x, y = ctx.train_set.tensors
    for _ in range(steps):
        with pytest.warns(UserWarning, match="self.log"):
            loss = module.training_step((x, y), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_slow_learner_is_frozen_after_session_one_and_the_fast_learner_trains_on() -> None:
    module = _safe()
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    assert [(p.name, p.epochs) for p in module.phases(ctx0)] == [("train", 20)]
    _sgd_steps(module, ctx0)
    module.on_task_end(ctx0)
    assert module.slow_backbone is not None and module.slow_cosine is not None
    slow_state = {k: v.clone() for k, v in module.slow_backbone.state_dict().items()}
    assert not any(p.requires_grad for p in module.slow_backbone.parameters())
    assert not any(p.requires_grad for p in module.slow_cosine.parameters())
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    assert [p.epochs for p in module.phases(ctx1)] == [15] and module.epochs == 20
    assert module.cosine_head.num_classes == 6 and module.slow_cosine.num_classes == 6
    assert not module.slow_cosine.weight[3:].any()  # never trained, never imprinted (code)
    fast_before = [p.detach().clone() for p in peft_parameters(module.backbone)]
    _sgd_steps(module, ctx1)
    assert not module.slow_backbone.training
    for key, value in module.slow_backbone.state_dict().items():
        assert torch.equal(value, slow_state[key]), key
    assert any(
        not torch.equal(a, b) for a, b in zip(fast_before, peft_parameters(module.backbone), strict=True)
    )
    trained = {id(p) for g in module.param_groups() for p in g["params"]}
    assert not trained & {id(p) for p in module.slow_backbone.parameters()}


def test_later_loss_is_ce_plus_alignment_sum_plus_cross_classification() -> None:
    module = _safe(align_weight=0.7, cross_weight=0.3)
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    _sgd_steps(module, ctx0, steps=1)
    module.on_task_end(ctx0)
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    with torch.no_grad():  # make the fast learner differ from the slow one
        for p in peft_parameters(module.backbone):
            p.add_(0.1 * torch.randn_like(p))
    module.eval()  # no dropout: the two fast passes agree
    x, y = ctx1.train_set.tensors
    fast, slow = module.backbone(x), module.slow_backbone(x)
    ce = F.cross_entropy(module.cosine_head(fast), y)
    align = (1 - F.cosine_similarity(fast, slow, dim=1)).sum()
    targets = torch.cat([torch.arange(3), y])
    s2f = F.cross_entropy(module.cosine_head(torch.cat([module.slow_cosine.weight[:3], slow])), targets)
    f2s = F.cross_entropy(module.slow_cosine(torch.cat([module.cosine_head.weight[:3], fast])), targets)
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, ce + 0.7 * align + 0.3 * (s2f + f2s))
    torch.testing.assert_close(module.cross_classification(fast, slow, y), s2f + f2s)


def test_sigma_is_reset_after_session_one_as_the_codes_setup_rp() -> None:
    """``setup_RP``/``setup_RP_branch`` call ``fc.reset_parameters()``: the slow learner's sigma is 10 for
    good, the fast learner starts session 2 at 10 and carries its trained sigma on from there."""
    module = _safe()
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    _sgd_steps(module, ctx0)
    trained = module.cosine_head.sigma.item()
    assert trained != 10.0  # session 1 trains sigma
    module.on_task_end(ctx0)
    assert module.slow_cosine is not None
    assert module.cosine_head.sigma.item() == 10.0 and module.slow_cosine.sigma.item() == 10.0
    module.eval()
    x = ctx0.train_set.tensors[0]
    fast, slow = module.learner_logits(x)
    torch.testing.assert_close(fast, 10.0 * module.head(module.backbone(x)))  # ridge logits times 10
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    assert module.cosine_head.sigma.item() == 10.0  # the fast learner's session 2 starts at 10
    _sgd_steps(module, ctx1)
    session_two = module.cosine_head.sigma.item()
    assert session_two != 10.0 and module.slow_cosine.sigma.item() == 10.0
    module.on_task_end(ctx1)
    assert module.cosine_head.sigma.item() == session_two  # no reset after later sessions (setup_RP_follow)
    kept = _safe(reset_sigma=False)
    kept.on_task_start(ctx0)
    _sgd_steps(kept, ctx0)
    sigma = kept.cosine_head.sigma.item()
    kept.on_task_end(ctx0)
    assert kept.slow_cosine is not None
    assert kept.cosine_head.sigma.item() == sigma == kept.slow_cosine.sigma.item()


def test_both_ridge_heads_project_with_one_w_rand_as_the_code() -> None:
    """``replace_fc_branch`` sets the slow head's ``W_rand`` to the fast head's before every fit."""
    shared = _safe()
    assert torch.equal(shared.head.projection, shared.slow_head.projection)
    independent = _safe(independent_projections=True)
    assert not torch.equal(independent.head.projection, independent.slow_head.projection)


def test_invalid_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="aggregation"):
        _safe(aggregation="concat")
    with pytest.raises(ConfigError, match="ridge_stats"):
        _safe(ridge_stats="both")
    with pytest.raises(ConfigError, match="PET"):
        _safe(peft="none")


def test_tiny_run_reports_the_aggregate_with_fast_and_slow_beside_it(run_tiny) -> None:
    doc, _ = run_tiny(*TINY_VIT, "method=safe", "method.later_epochs=1", "method.rp_dim=64")
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    extra = doc["extra_matrices"]
    assert set(extra) == {"fast_acc", "slow_acc"}
    assert extra["fast_acc"][0] == doc["acc_matrix"][0]  # session 1: the fast learner alone
    assert doc["acc_matrix"][1] != extra["fast_acc"][1]  # later: the aggregate, not the fast learner
    assert doc["last_acc"] > 30.0  # 10 digit classes: chance is 10 %
