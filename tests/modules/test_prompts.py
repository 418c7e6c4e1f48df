"""Prompt building blocks (cl_bench/modules/prompts.py) against independent computations on tiny tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.modules.prompts import (
    CodaPrompt,
    PromptPool,
    block_forward,
    coda_attention_weights,
    cosine_similarity,
    orthogonality_penalty,
    orthonormal_extension,
    prefix_attention,
    prompted_tokens,
    pull_constraint,
    select_top_k,
    timm_vit,
)

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm_vit(TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)).eval()


def manual_attention(
    attn, x: torch.Tensor, key_prefix: torch.Tensor, value_prefix: torch.Tensor
) -> torch.Tensor:
    """Multi-head attention with an explicit softmax, keys ``[Pk; W_k x]``, values ``[Pv; W_v x]``."""
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    w_q, w_k, w_v = attn.qkv.weight.split(dim)
    b_q, b_k, b_v = attn.qkv.bias.split(dim)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    k, v = torch.cat([key_prefix, k], dim=1), torch.cat([value_prefix, v], dim=1)
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / head_dim**0.5, dim=-1)
        out[..., cols] = weights @ v[..., cols]
    return out @ attn.proj.weight.T + attn.proj.bias


def test_prefix_attention_changes_only_keys_and_values(vit) -> None:
    attn = vit.blocks[0].attn
    x = torch.randn(3, 5, 32)
    key_prefix, value_prefix = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        prefixed = prefix_attention(attn, x, (key_prefix, value_prefix))
        expected = manual_attention(attn, x, key_prefix, value_prefix)
        torch.testing.assert_close(prefixed, expected, rtol=1e-5, atol=1e-5)
        assert prefixed.shape == x.shape  # the queries (and so the number of tokens) are the input's own
        empty = torch.zeros(3, 0, 32)
        torch.testing.assert_close(prefix_attention(attn, x, (empty, empty)), attn(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prefix_attention(attn, x, None), attn(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(manual_attention(attn, x, empty, empty), attn(x), rtol=1e-5, atol=1e-5)


def test_a_prefix_whose_keys_score_minus_infinity_leaves_the_block_unchanged(vit) -> None:
    """Prefix values enter only through the attention weights their keys get."""
    block = vit.blocks[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        heads = block.attn.num_heads
        query_dirs = block.attn.qkv(block.norm1(x))[..., :32].reshape(2, 5, heads, -1)
        # keys = -1e4 * (mean query direction of each head): every query scores the prefix far below the rest
        key_prefix = (-1e4 * query_dirs.mean(dim=1, keepdim=True)).reshape(2, 1, 32)
        far = block_forward(block, x, (key_prefix, torch.randn(2, 1, 32) * 100))
        assert (query_dirs.reshape(2, 5, heads, -1) * query_dirs.mean(dim=1, keepdim=True)).sum(-1).min() > 0
        torch.testing.assert_close(far, block(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(
            block_forward(block, x, (torch.randn(2, 1, 32), torch.randn(2, 1, 32))), block(x)
        )


def test_no_prompts_gives_the_pre_trained_forward_and_input_prompts_follow_l2p(vit) -> None:
    x = torch.randn(2, 3, 16, 16)
    prompts = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(prompted_tokens(vit, x), vit.forward_features(x))
        # independent construction: [CLS, prompts, patches] + [pos_cls, pos_cls x3, pos_patches]
        patches = vit.patch_embed(x)
        pos = vit.pos_embed
        sequence = torch.cat([vit.cls_token.expand(2, -1, -1), prompts, patches], dim=1)
        sequence = sequence + torch.cat([pos[:, :1], pos[:, :1].expand(1, 3, -1), pos[:, 1:]], dim=1)
        expected = vit.norm(vit.blocks(sequence))
        torch.testing.assert_close(prompted_tokens(vit, x, input_prompts=prompts), expected)


def test_appended_tokens_equal_the_official_prepend(vit) -> None:
    """dualprompt-pytorch puts prompt tokens before [CLS]; after [CLS] gives the same outputs, permuted."""
    x = torch.randn(2, 3, 16, 16)
    tokens_at_1 = torch.randn(2, 2, 32)
    with torch.no_grad():
        ours = prompted_tokens(vit, x, appended={1: tokens_at_1})
        sequence = vit.blocks[0](vit._pos_embed(vit.patch_embed(x)))
        official = vit.norm(vit.blocks[1](torch.cat([tokens_at_1, sequence], dim=1)))
        torch.testing.assert_close(ours[:, 0], official[:, 2], rtol=1e-5, atol=1e-5)  # [CLS]
        torch.testing.assert_close(ours[:, 1:3], official[:, :2], rtol=1e-5, atol=1e-5)


def test_selection_picks_the_nearest_keys_and_the_batch_majority() -> None:
    keys = torch.eye(4, 6) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])  # norms differ: cosine ignores them
    queries = torch.tensor([[0.1, 1.0, 0.6, 0, 0, 0], [1.0, 0, 0.2, 0, 0, 0], [0, 0.5, 0, 1.0, 0, 0]])
    similarity = cosine_similarity(queries, keys)
    torch.testing.assert_close(similarity, F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T)
    assert select_top_k(similarity, 1)[:, 0].tolist() == [1, 0, 3]
    assert select_top_k(similarity, 2).tolist() == [[1, 2], [0, 2], [3, 1]]
    # counts in the batch: key 2 twice, key 1 twice, key 0 once, key 3 once -> ties go to the lower index
    assert select_top_k(similarity, 2, batchwise=True).tolist() == [[1, 2]] * 3
    chosen = select_top_k(similarity, 2)
    expected = sum(similarity[b, chosen[b]].sum() for b in range(3)) / 3
    torch.testing.assert_close(pull_constraint(similarity, chosen), expected)
    with pytest.raises(ValueError, match="top_k"):
        select_top_k(similarity, 5)


def test_prompt_pool_entries_freeze_separately() -> None:
    pool = PromptPool(3, 4, (2, 4))
    assert all(p.detach().abs().max() <= 1 for p in [*pool.keys, *pool.prompts])
    pool.set_trainable([1])
    assert [k.requires_grad for k in pool.keys] == [False, True, False]
    assert pool.gather(torch.tensor([[2, 0]])).shape == (1, 2, 2, 4)
    assert pool.similarity(torch.randn(5, 4), entries=2).shape == (5, 2)


def test_gram_schmidt_extension_is_orthogonal_to_non_orthogonal_old_rows() -> None:
    torch.manual_seed(0)
    old = torch.randn(3, 8)  # trained components: not orthogonal to each other
    new = orthonormal_extension(old, 4)
    torch.testing.assert_close(new @ new.T, torch.eye(4), rtol=0, atol=1e-6)
    assert (new @ old.T).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="cannot add 6 components"):
        orthonormal_extension(old, 6)


def test_coda_new_components_are_orthogonal_to_the_old_and_the_old_freeze() -> None:
    torch.manual_seed(0)
    coda = CodaPrompt([0, 2], dim=16, length=4, components_per_task=3)
    coda.add_task()
    with torch.no_grad():  # "training" moves task 0's chunks away from orthonormal
        for store in (*coda.components, *coda.keys, *coda.attention):
            store[0].add_(0.3 * torch.randn_like(store[0]))
    coda.add_task()
    for layer in range(2):
        components, keys, attention = coda.layer_tensors(layer)
        for matrix in (components.reshape(6, -1), keys, attention):
            assert (matrix[3:] @ matrix[:3].T).abs().max() < 1e-5
            torch.testing.assert_close(matrix[3:] @ matrix[3:].T, torch.eye(3), rtol=0, atol=1e-5)
        assert not coda.components[layer][0].requires_grad and coda.components[layer][1].requires_grad
    prefixes = coda.prefixes(torch.randn(5, 16))
    assert set(prefixes) == {0, 2} and prefixes[2][0].shape == prefixes[2][1].shape == (5, 2, 16)


def test_coda_attention_weights_match_the_formula_and_are_differentiable() -> None:
    torch.manual_seed(0)
    queries = torch.randn(2, 5, requires_grad=True)
    keys = torch.randn(3, 5, requires_grad=True)
    attention = torch.randn(3, 5, requires_grad=True)
    alpha = coda_attention_weights(queries, keys, attention)
    expected = torch.tensor(
        [
            [float(F.cosine_similarity(queries[b] * attention[m], keys[m], dim=0).detach()) for m in range(3)]
            for b in range(2)
        ]
    )
    torch.testing.assert_close(alpha.detach(), expected, rtol=1e-5, atol=1e-6)
    alpha.sum().backward()
    for tensor in (queries, keys, attention):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_orthogonality_penalty_is_zero_for_orthonormal_rows() -> None:
    assert float(orthogonality_penalty(torch.eye(3, 5))) == 0.0
    torch.testing.assert_close(orthogonality_penalty(2 * torch.eye(2)), torch.tensor(4.5))  # (4-1)^2 * 2 / 4


def test_non_vit_backbones_are_rejected() -> None:
    with pytest.raises(ConfigError, match="timm ViT"):
        timm_vit(CifarResNet(20))
