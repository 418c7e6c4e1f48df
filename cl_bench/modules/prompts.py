"""Prompts for a frozen timm ViT, shared by L2P, DualPrompt and CODA-Prompt.

Official code these follow (read for ``shared/research/methods_vit.md`` §5): ``JH-LEE-KR/l2p-pytorch``
(``prompt.py``, ``vision_transformer.py``), ``JH-LEE-KR/dualprompt-pytorch`` (``prompt.py``, ``attention.py``)
and ``GT-RIPL/CODA-Prompt`` (``models/zoo.py``, ``models/vit.py``).

Three ways a prompt enters the ViT, all through :func:`prompted_tokens`, a forward pass over timm's own
``VisionTransformer`` modules (patch embedding, blocks, final norm) that never modifies them:

* **input prompts** (L2P): tokens inserted right after [CLS] before the first block, with [CLS]'s position
  embedding added (l2p-pytorch resizes ``pos_embed`` by repeating the [CLS] entry for the prompt tokens);
* **prefix tuning** (DualPrompt, CODA-Prompt): per layer, ``Lp`` key and ``Lp`` value vectors concatenated to
  that layer's attention keys and values (after the ``qkv`` projection, split into heads like them); the
  queries, the number of tokens and everything outside attention are unchanged (:func:`prefix_attention`);
* **prompt tuning** (DualPrompt's switch): per layer, tokens appended to the sequence before the block and
  kept in all later layers. They sit after [CLS] here (before it in dualprompt-pytorch): self-attention
  without masks is permutation-equivariant, so the place does not change any output.

Selection (L2P, DualPrompt): cosine similarity between the query (the frozen model's [CLS] feature) and
learnable keys, top-N per image or, optionally, the N entries most often chosen in the batch (the official
``batchwise_prompt``), and the surrogate pull loss ``sum_{selected} cos(q, k) / B`` (official ``reduce_sim``).
CODA-Prompt: :class:`CodaPrompt` (components, keys and attention vectors, Gram-Schmidt initialisation per
task, orthogonality penalty).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError

#: ``(keys, values)`` of one layer's prefix, each ``[B, Lp, D]`` in the embedding space.
Prefix = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- the ViT forward
def timm_vit(backbone: Backbone) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``backbone``, checked for what prompting needs."""
    model = getattr(backbone, "model", None)
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "cls_token")
    if model is None or not all(hasattr(model, a) for a in needed) or model.cls_token is None:
        raise ConfigError(
            "this method places prompts or adapters in a timm ViT with a [CLS] token; "
            f"{type(backbone).__name__} is not one. Use backbone=vit_b16_in21k_ft_in1k, vit_tiny6_cifar or "
            "another timm vit_* model"
        )
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "no_embed_class", False):
        raise ConfigError(
            f"{backbone.name}: prompts need exactly one [CLS] token with its own position embedding"
        )
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if not all(
            hasattr(block, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        ):
            raise ConfigError(f"{type(block).__name__} is not a timm pre-norm ViT Block")
        if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise ConfigError(f"{type(attn).__name__} is not timm's standard Attention (qkv, no gate)")
    return model


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[CLS] + patches`` with position embeddings: the input of the first block (timm's own steps)."""
    tokens = vit._pos_embed(vit.patch_embed(x))
    return vit.norm_pre(vit.patch_drop(tokens))


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """timm ``Attention`` on ``x`` ``[B, N, D]`` with ``prefix`` keys/values prepended to its own.

    ``prefix = (Pk, Pv)``, each ``[B, Lp, D]``, is split into heads like the projected keys and values;
    the queries come from ``x`` alone, so the output keeps ``N`` tokens. ``None`` or ``Lp = 0``: exactly
    the attention of the pre-trained model.
    """
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        key_prefix, value_prefix = (p.reshape(batch, -1, heads, head_dim).transpose(1, 2) for p in prefix)
        k = torch.cat([key_prefix.to(k.dtype), k], dim=2)
        v = torch.cat([value_prefix.to(v.dtype), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    return attn.proj_drop(attn.proj(out))


def block_forward(block: nn.Module, x: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
    """timm's pre-norm ``Block`` with a prefix in its attention (``None``: the block itself)."""
    if prefix is None:
        return block(x)
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prompted_tokens(
    vit: nn.Module,
    x: torch.Tensor,
    input_prompts: torch.Tensor | None = None,
    prefixes: Mapping[int, Prefix] | None = None,
    appended: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """All output tokens ``[B, N', D]`` after the final norm, [CLS] first.

    Args:
        input_prompts: ``[B, P, D]`` tokens placed after [CLS] (with its position embedding) before block 0;
            they occupy positions ``1..P`` of the output.
        prefixes: layer index -> prefix keys/values of that layer's attention.
        appended: layer index -> ``[B, P_l, D]`` tokens added to the sequence before that block.
    """
    tokens = embed_tokens(vit, x)
    if input_prompts is not None:
        prompts = input_prompts.to(tokens.dtype) + vit.pos_embed[:, :1].to(tokens.dtype)
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
    prefixes = prefixes or {}
    appended = appended or {}
    for index, block in enumerate(vit.blocks):
        if index in appended:
            tokens = torch.cat([tokens[:, :1], appended[index].to(tokens.dtype), tokens[:, 1:]], dim=1)
        tokens = block_forward(block, tokens, prefixes.get(index))
    return vit.norm(tokens)


# --------------------------------------------------------------------------- key-query selection
def cosine_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` cosine similarities, normalised as the official code (``x * rsqrt(max(|x|^2, 1e-12))``)."""

    def normalise(t: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12))

    return normalise(queries.float()) @ normalise(keys.float()).T


def select_top_k(similarity: torch.Tensor, top_k: int, batchwise: bool = False) -> torch.Tensor:
    """Indices ``[B, top_k]`` of the most similar keys per image; ``batchwise``: for every image, the
    ``top_k`` keys chosen most often in the batch (official ``batchwise_prompt``; ties: the lower index)."""
    if not 1 <= top_k <= similarity.shape[1]:
        raise ValueError(f"top_k={top_k} must lie in [1, {similarity.shape[1]}]")
    chosen = similarity.topk(top_k, dim=1).indices
    if not batchwise:
        return chosen
    counts = torch.bincount(chosen.flatten(), minlength=similarity.shape[1])
    major = torch.sort(-counts, stable=True).indices[:top_k]
    return major.unsqueeze(0).expand(similarity.shape[0], -1)


def pull_constraint(similarity: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The surrogate loss's reward ``sum_b sum_{j in chosen_b} cos(q_b, k_j) / B`` (official ``reduce_sim``;
    the training loss subtracts ``coefficient * pull_constraint``)."""
    return similarity.gather(1, chosen).sum() / similarity.shape[0]


class PromptPool(nn.Module):
    """``size`` entries, each a learnable key ``[key_dim]`` and a prompt of shape ``prompt_shape``.

    Entries are separate parameters so that a method can freeze some (DualPrompt's per-task E-prompts) and
    leave their values bit-identical whatever the optimiser. Keys and prompts start ``U(-1, 1)`` (official
    ``prompt_init`` / ``prompt_key_init`` ``uniform``).
    """

    def __init__(self, size: int, key_dim: int, prompt_shape: tuple[int, ...]) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"a prompt pool needs at least one entry, got size={size}")
        self.keys = nn.ParameterList(nn.Parameter(torch.empty(key_dim).uniform_(-1, 1)) for _ in range(size))
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.empty(prompt_shape).uniform_(-1, 1)) for _ in range(size)
        )

    @property
    def size(self) -> int:
        return len(self.keys)

    def similarity(self, queries: torch.Tensor, entries: int | None = None) -> torch.Tensor:
        """``[B, entries]`` cosine similarities to the first ``entries`` keys (default: all)."""
        keys = torch.stack(tuple(self.keys)[: entries or self.size])
        return cosine_similarity(queries, keys)

    def gather(self, chosen: torch.Tensor) -> torch.Tensor:
        """The chosen prompts ``[B, top_k, *prompt_shape]`` for indices ``[B, top_k]``."""
        return torch.stack(tuple(self.prompts))[chosen]

    def set_trainable(self, entries: list[int]) -> None:
        """Only these entries' keys and prompts get gradients."""
        for index, (key, prompt) in enumerate(zip(self.keys, self.prompts, strict=True)):
            key.requires_grad_(index in entries)
            prompt.requires_grad_(index in entries)


# --------------------------------------------------------------------------- CODA-Prompt
def orthonormal_extension(old: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to the span of the rows of ``old`` ``[m, d]``.

    CODA-Prompt's Gram-Schmidt initialisation of a new task's components (``CodaPrompt.gram_schmidt``):
    Gaussian vectors, minus their projection on what came before, normalised. The official loop subtracts
    the projection on each old row separately, which is orthogonal to them only while the old rows are
    themselves orthogonal (training does not keep them so); projecting on their span (an orthonormal basis
    from QR) makes the new rows orthogonal to the old ones in every case.
    """
    dim = old.shape[1]
    rank = int(torch.linalg.matrix_rank(old.double())) if len(old) else 0
    if rank + count > dim:
        raise ConfigError(
            f"cannot add {count} components orthogonal to {rank} earlier ones in {dim} dimensions: lower "
            "method.pool_size (components per task = pool_size / tasks) or use more dimensions"
        )
    basis = torch.linalg.qr(old.double().T).Q[:, :rank] if rank else old.new_zeros(dim, 0).double()
    rows = []
    for _ in range(count):
        while True:  # redraw in the (measure-zero) case of a vector inside the span, as the official code
            vector = torch.randn(dim, dtype=torch.float64)
            vector = vector - basis @ (basis.T @ vector)
            norm = vector.norm()
            if norm > 1e-8:
                break
        rows.append(vector / norm)
        basis = torch.cat([basis, rows[-1].unsqueeze(1)], dim=1)
    return torch.stack(rows).to(device=old.device, dtype=old.dtype)


def orthogonality_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """``mean((M M^T - I)^2)`` over the rows of ``matrix`` ``[k, d]`` (official ``ortho_penalty``)."""
    eye = torch.eye(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
    return (matrix @ matrix.T - eye).pow(2).mean()


def coda_attention_weights(
    queries: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """``alpha [B, M]``: ``cos(q * a_m, k_m)`` for every component ``m`` (CODA-Prompt Eq. 4; official
    ``aq_k``). ``queries [B, D]``, ``keys`` and ``attention`` ``[M, D]``; differentiable in all three."""
    attended = F.normalize(queries.unsqueeze(1) * attention.unsqueeze(0), dim=2)
    return torch.einsum("bkd,kd->bk", attended, F.normalize(keys, dim=1))


class CodaPrompt(nn.Module):
    """CODA-Prompt's decomposed prompts for the layers ``layers`` of a ViT of width ``dim``.

    Per layer: components ``P [M, length, dim]``, keys ``K [M, dim]`` and attention vectors ``A [M, dim]``,
    ``components_per_task`` of each added per task (:meth:`add_task`, Gram-Schmidt against the earlier ones;
    the earlier ones frozen). The prompt of an image with query ``q`` is ``sum_m alpha_m P_m`` with
    ``alpha = coda_attention_weights(q, K, A)``; its first ``length // 2`` rows are the prefix keys and the
    rest the prefix values (official ``Ek = P_[:, :i]``, ``Ev = P_[:, i:]``).
    """

    def __init__(self, layers: list[int], dim: int, length: int, components_per_task: int) -> None:
        super().__init__()
        if length < 2 or length % 2:
            raise ConfigError(
                f"method.prompt_length={length}: CODA-Prompt splits a prompt into equal key and value "
                "halves, so it must be even and >= 2"
            )
        if components_per_task < 1:
            raise ConfigError("method.pool_size must give at least one component per task")
        self.layers = list(layers)
        self.dim = dim
        self.length = length
        self.components_per_task = components_per_task
        #: ``components[l][t]``, ``keys[l][t]``, ``attention[l][t]``: task ``t``'s chunk at ``layers[l]``.
        self.components = nn.ModuleList(nn.ParameterList() for _ in self.layers)
        self.keys = nn.ModuleList(nn.ParameterList() for _ in self.layers)
        self.attention = nn.ModuleList(nn.ParameterList() for _ in self.layers)

    @property
    def num_tasks(self) -> int:
        return len(self.keys[0]) if self.layers else 0

    def add_task(self) -> None:
        """Append a chunk of components, keys and attention vectors orthonormal to the earlier ones (which
        are frozen from now on)."""
        count = self.components_per_task
        for chunks in (*self.components, *self.keys, *self.attention):
            for chunk in chunks:
                chunk.requires_grad_(False)
        for layer in range(len(self.layers)):
            chunks = self.components[layer]
            old_p = torch.cat(tuple(chunks)) if len(chunks) else torch.zeros(0, self.length, self.dim)
            old_p = old_p.reshape(-1, self.length * self.dim)
            new_p = orthonormal_extension(old_p, count).reshape(count, self.length, self.dim)
            self.components[layer].append(nn.Parameter(new_p))
            for store in (self.keys[layer], self.attention[layer]):
                old = torch.cat(tuple(store)) if len(store) else new_p.new_zeros(0, self.dim)
                store.append(nn.Parameter(orthonormal_extension(old, count)))

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P [M, length, dim], K [M, dim], A [M, dim])`` of ``self.layers[layer]``, all tasks so far
        (``M = 0`` before the first task)."""
        if not self.num_tasks:
            empty = torch.zeros(0, self.dim)
            return empty.reshape(0, 1, self.dim).expand(0, self.length, self.dim), empty, empty
        return (
            torch.cat(tuple(self.components[layer])),
            torch.cat(tuple(self.keys[layer])),
            torch.cat(tuple(self.attention[layer])),
        )

    def prefixes(self, queries: torch.Tensor) -> dict[int, Prefix]:
        """Layer -> prefix keys/values ``[B, length // 2, dim]`` each, for queries ``[B, dim]``."""
        half = self.length // 2
        out = {}
        for index, layer in enumerate(self.layers):
            components, keys, attention = self.layer_tensors(index)
            alpha = coda_attention_weights(queries, keys, attention)
            prompt = torch.einsum("bk,kld->bld", alpha, components.to(alpha.dtype))
            out[layer] = (prompt[:, :half], prompt[:, half:])
        return out

    def orthogonality_loss(self) -> torch.Tensor:
        """Sum over layers of the penalty on ``K``, ``A`` and flattened ``P`` (official ``ortho_mu`` term,
        before its weight)."""
        terms = []
        for index in range(len(self.layers)):
            components, keys, attention = self.layer_tensors(index)
            terms += [orthogonality_penalty(keys), orthogonality_penalty(attention)]
            terms.append(orthogonality_penalty(components.reshape(len(components), -1)))
        return torch.stack(terms).sum()
