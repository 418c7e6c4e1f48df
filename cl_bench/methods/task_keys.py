"""Task keys: one learnable vector per task, matched by cosine similarity to a frozen model's query feature.

LayerNorm tuning's two-stage variant (De Min et al., arXiv 2308.09610; official code
``couple/blocks.py::WeightSelectionMechanism`` as read in ``shared/research/methods_vit.md`` §4.2-4.4):

* keys ``k_t in R^D``; the query ``q`` is the pre-trained model's output for the image (ViT: the [CLS] token
  after the final LayerNorm), so it never changes during the run;
* training task ``c``: maximise ``mean_b cos(q_b, k_c)``, i.e. minimise :meth:`TaskKeys.pull_loss`; only
  ``k_c`` is trainable (older keys are frozen tensors of their own);
* inference after task ``c``: ``t_hat = argmax_{t <= c} cos(q, k_t)`` (:meth:`TaskKeys.select`).

Initialisation (official ``--key_init``, default ``orthogonal``): the ``T x D`` matrix of all keys is drawn
at once with ``nn.init.orthogonal_`` (``T`` = number of tasks, known from the scenario) and task ``t`` takes
row ``t``, so distinct tasks start from orthonormal keys; ``uniform`` draws ``U(-1, 1)`` instead. The official
two-stage script passes ``--new_key`` (each key keeps its own initial row); without it a new key starts as a
copy of the previous one, our ``copy_previous=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import ConfigError
from cl_bench.modules.precision import float32

KEY_INITS = ("orthogonal", "uniform")


class TaskKeys(nn.Module):
    """Per-task keys of dimension ``dim`` for up to ``num_tasks`` tasks.

    Args:
        dim: query/key dimension (the backbone's embedding size).
        num_tasks: how many keys the run will need; fixes the orthogonal initial matrix.
        init: ``orthogonal`` (official default) or ``uniform``.
    """

    def __init__(self, dim: int, num_tasks: int, init: str = "orthogonal") -> None:
        super().__init__()
        if init not in KEY_INITS:
            raise ConfigError(f"key init {init!r}: choose one of {list(KEY_INITS)}")
        if num_tasks < 1:
            raise ValueError("num_tasks must be >= 1")
        initial = torch.empty(num_tasks, dim)
        if init == "orthogonal":
            nn.init.orthogonal_(initial)
        else:
            nn.init.uniform_(initial, -1.0, 1.0)
        #: The initial value of every task's key (rows); a key is created from its row when its task starts.
        self.register_buffer("initial", initial)
        self.keys = nn.ParameterList()

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def add_key(self, copy_previous: bool = False) -> int:
        """Create the next task's key (from its initial row, or a copy of the last key) and freeze the older
        ones; returns its index."""
        index = self.num_keys
        if index >= len(self.initial):
            raise IndexError(f"all {len(self.initial)} keys are already in use")
        source = self.keys[-1] if copy_previous and index > 0 else self.initial[index]
        for key in self.keys:
            key.requires_grad_(False)
        self.keys.append(nn.Parameter(source.detach().clone()))
        return index

    def stacked(self) -> torch.Tensor:
        """All keys so far as a ``[num_keys, D]`` tensor."""
        if not self.num_keys:
            raise RuntimeError("no task key yet: call add_key() when a task starts")
        return torch.stack(tuple(self.keys))

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """``[B, num_keys]`` cosine similarities between queries ``[B, D]`` and every key, in float32 whatever
        the autocast (:mod:`cl_bench.modules.precision`)."""
        with float32(queries.device):
            keys = F.normalize(self.stacked().float(), dim=-1)
            return F.normalize(queries.float(), dim=-1) @ keys.T

    @torch.no_grad()
    def select(self, queries: torch.Tensor) -> torch.Tensor:
        """The most similar key's index per query, ``[B]`` (ties: the lowest index)."""
        return self.similarity(queries).argmax(dim=1)

    def pull_loss(self, queries: torch.Tensor, task: int) -> torch.Tensor:
        """``-mean_b cos(q_b, k_task)``: minimising it pulls key ``task`` towards its task's queries."""
        with float32(queries.device):
            key = F.normalize(self.keys[task].float(), dim=-1)
            return -(F.normalize(queries.float(), dim=-1) @ key).mean()


class AttendedKeys(nn.Module):
    """Keys with a per-task attention vector, matched as ``cos(a_t * q, k_t)``: one selector per LayerNorm of
    LayerNorm tuning's single-stage variant (official ``WeightSelectionMechanism`` with ``--use_att``,
    ``couple/blocks.py`` l.72-177; ``shared/research/methods_vit.md`` §4.3).

    Keys and attention vectors are drawn as two independent ``T x D`` matrices (``init``, as
    :class:`TaskKeys`); a new task's pair starts from its own rows, or (``copy_previous``, the official
    single-stage script, which does not pass ``--new_key``) from a copy of the previous task's pair.
    """

    def __init__(self, dim: int, num_tasks: int, init: str = "orthogonal") -> None:
        super().__init__()
        self.keys = TaskKeys(dim, num_tasks, init)
        self.attention = TaskKeys(dim, num_tasks, init)

    @property
    def num_keys(self) -> int:
        return self.keys.num_keys

    def add_key(self, copy_previous: bool = False) -> int:
        """The next task's key and attention vector; the older ones are frozen."""
        self.attention.add_key(copy_previous)
        return self.keys.add_key(copy_previous)

    def parameters_of(self, task: int) -> tuple[nn.Parameter, nn.Parameter]:
        return self.keys.keys[task], self.attention.keys[task]

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """``[B, num_keys]``: ``cos(a_t * q_b, k_t)`` for every task so far, in float32."""
        with float32(queries.device):
            attended = queries.float()[:, None, :] * self.attention.stacked().float()[None]
            keys = F.normalize(self.keys.stacked().float(), dim=-1)
            return (F.normalize(attended, dim=-1) * keys[None]).sum(dim=-1)

    @torch.no_grad()
    def select(self, queries: torch.Tensor) -> torch.Tensor:
        """The most similar task per query, ``[B]`` (ties: the lowest index)."""
        return self.similarity(queries).argmax(dim=1)

    def match(self, queries: torch.Tensor, task: int) -> torch.Tensor:
        """``mean_b cos(a_task * q_b, k_task)`` (differentiable in the queries, the key and the attention)."""
        with float32(queries.device):
            key, attention = self.parameters_of(task)
            attended = F.normalize(queries.float() * attention.float(), dim=-1)
            return (attended @ F.normalize(key.float(), dim=-1)).mean()
