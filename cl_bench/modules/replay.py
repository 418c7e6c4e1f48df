"""A reservoir-sampled replay buffer (Vitter 1985, Algorithm R) for rehearsal methods (ER, DER, DER++).

What a slot stores: the example's **index in the training image source** (``TaskDataset.images``, the
train split that every task's dataset views), its label (class-order position), the task it came from and,
for DER/DER++, the logits the network gave it when it was inserted. Images are not copied: a replayed
example is read again from the image source and goes through the **training transform again**, so it gets
a fresh augmentation every time it is replayed (as Mammoth, which stores un-augmented images and augments
them when sampled), and the buffer costs a few integers per slot whatever the image size. ``M`` examples of
storage are still the method's memory cost: they are kept images, only not duplicated in RAM.

The slots, the number of examples offered so far and the logits are registered buffers, so they are part of
the method's ``state_dict`` (a saved model restores its memory; a run resuming from it needs the training
image source back, which the next task's :class:`~cl_bench.methods.base.TaskContext` provides).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from cl_bench.data.base import TaskDataset
from cl_bench.errors import ConfigError


class ReservoirBuffer(nn.Module):
    """``capacity`` slots filled by reservoir sampling over the stream of offered examples.

    The ``s``-th offered example (0-based) fills slot ``s`` while ``s < capacity``; afterwards it draws
    ``j`` uniformly from ``{0, ..., s}`` and replaces slot ``j`` if ``j < capacity``. Every example of a
    stream of ``N`` is then in the buffer with probability ``capacity / N``. Randomness comes from the
    global torch generator (seeded by the run's ``seed``).

    Args:
        capacity: the number of slots ``M``.
        store_logits: also keep each example's logits at insertion time (DER/DER++); every offer must
            have the same width (DER++ stores the scenario's every class, as Mammoth's fixed-size head).
    """

    def __init__(self, capacity: int, store_logits: bool = False) -> None:
        super().__init__()
        if capacity < 1:
            raise ConfigError(f"the replay buffer needs at least one slot, got capacity={capacity}")
        self.capacity = capacity
        self.store_logits = store_logits
        self.register_buffer("index", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("label", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("task", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))
        if store_logits:
            self.register_buffer("logits", torch.zeros(capacity, 0))

    def __len__(self) -> int:
        """The number of filled slots."""
        return min(int(self.num_seen), self.capacity)

    def _reservoir_slots(self, n: int) -> list[int]:
        """Slots for the next ``n`` offered examples (``-1``: not kept); advances the stream counter."""
        seen = int(self.num_seen)
        positions = torch.arange(seen, seen + n, dtype=torch.float64)
        draws = (torch.rand(n, dtype=torch.float64) * (positions + 1)).long().tolist()
        slots = [
            s if s < self.capacity else (j if j < self.capacity else -1)
            for s, j in zip(range(seen, seen + n), draws)
        ]
        self.num_seen.fill_(seen + n)
        return slots

    @torch.no_grad()
    def add(
        self, index: torch.Tensor, label: torch.Tensor, task: int, logits: torch.Tensor | None = None
    ) -> None:
        """Offer a batch of examples (all from ``task``) in stream order.

        When two examples of the batch draw the same slot, the later one replaces the earlier one, as in a
        sequential pass.
        """
        if self.store_logits != (logits is not None):
            raise ValueError("pass logits exactly when the buffer stores them (store_logits)")
        slots = self._reservoir_slots(len(index))
        last: dict[int, int] = {}  # slot -> position in the batch of its last writer
        for position, slot in enumerate(slots):
            if slot >= 0:
                last[slot] = position
        if last:
            device = self.index.device
            target = torch.tensor(list(last.keys()), dtype=torch.long, device=device)
            source = torch.tensor(list(last.values()), dtype=torch.long, device=index.device)
            self.index[target] = index[source].to(device)
            self.label[target] = label[source].to(device)
            self.task[target] = task
            if logits is not None:
                self._store_logits(target, logits[source].detach())

    def _store_logits(self, target: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits.shape[1] == 0:  # the first offer fixes the width
            self.logits = self.logits.new_zeros(self.capacity, logits.shape[1])
        if logits.shape[1] != self.logits.shape[1]:
            raise ValueError(
                f"logits of width {logits.shape[1]} offered to a buffer storing width {self.logits.shape[1]}"
            )
        self.logits[target] = logits.to(self.logits)

    def sample(self, n: int) -> torch.Tensor:
        """``min(n, len(self))`` distinct filled slots drawn uniformly (on the buffer's device)."""
        return torch.randperm(len(self))[:n].to(self.index.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "logits"
        if self.store_logits and key in state_dict:  # take the saved width before copying
            self.logits = self.logits.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class IndexedDataset(Dataset):
    """A :class:`TaskDataset` whose items also carry their image-source index: ``(x, y, index)``."""

    def __init__(self, dataset: TaskDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.dataset[k]
        return x, y, int(self.dataset.indices[k])


def load_examples(dataset: TaskDataset, indices: Sequence[int]) -> torch.Tensor:
    """The images at ``indices`` of ``dataset``'s image source, through its (training) transform again."""
    batch = torch.stack([dataset.transform(dataset.images.image(int(i))) for i in indices])
    return batch if dataset.batch_transform is None else dataset.batch_transform(batch)


def replayable(dataset: Dataset) -> TaskDataset:
    """``dataset`` if replay can re-read its images (a :class:`TaskDataset`), else a clear error."""
    if not isinstance(dataset, TaskDataset):
        raise ConfigError(
            f"replay needs the runner's TaskDataset (an image source and a transform) to re-read buffered "
            f"examples, got {type(dataset).__name__}"
        )
    return dataset
