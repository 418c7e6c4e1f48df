"""Containers for labelled images and the per-task views the runner trains and tests on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from cl_bench.errors import DataError


class ImageSource(Protocol):
    """Labelled images: ``labels[i]`` is image ``i``'s class id; ``image(i)`` a uint8 ``[3, H, W]`` tensor."""

    labels: np.ndarray
    source: str

    def __len__(self) -> int: ...

    def image(self, index: int) -> torch.Tensor: ...


class ArrayImages:
    """Labelled images held in memory as a uint8 array.

    Args:
        images: ``[N, H, W, 3]`` RGB or ``[N, H, W]`` greyscale uint8 (greyscale is expanded to 3 channels).
        labels: ``[N]`` integer class ids in ``[0, num_classes)``.
        source: where the arrays came from, used in error messages.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str = "arrays") -> None:
        images = images if isinstance(images, np.ndarray) else np.asarray(images)  # keeps np.memmap
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise DataError(f"{source}: images must be uint8 (0-255), got {images.dtype}")
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(
                f"{source}: images must be [N,H,W,3] RGB or [N,H,W] greyscale uint8, got shape {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{source}: labels must be a 1-d array of {len(images)} ints, got shape {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
        self.images = images if images.flags.c_contiguous else np.ascontiguousarray(images)
        self.labels = labels.astype(np.int64)
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 ``[3, H, W]`` tensor."""
        image = self.images[index]
        if not image.flags.writeable:  # read-only memory maps: torch needs its own copy
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1)


@dataclass
class ClassificationData:
    """A dataset's train and test splits with class names (index = label).

    A dataset of several domains (DomainNet) also names them and gives each image's domain, which
    ``scenario=dil`` splits the tasks by: ``train_domains[i]`` is the index in ``domain_names`` of train image
    ``i`` (the same for ``test_domains``). All three are set together or all left ``None``.
    """

    name: str
    train: ImageSource
    test: ImageSource
    class_names: list[str]
    #: Whether a horizontal flip keeps an image's label (false for digits and text).
    hflip_invariant: bool = True
    domain_names: list[str] | None = None
    train_domains: np.ndarray | None = None
    test_domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.class_names)
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= n):
                raise DataError(
                    f"{self.name}: {split_name} labels span [{split.labels.min()}, {split.labels.max()}] "
                    f"but there are {n} class names; labels must lie in [0, {n})"
                )
        given = [v is not None for v in (self.domain_names, self.train_domains, self.test_domains)]
        if any(given) and not all(given):
            raise DataError(
                f"{self.name}: set domain_names, train_domains and test_domains together (or none of them)"
            )
        if self.domain_names is not None:
            self.domain_names = [str(d) for d in self.domain_names]
            self.train_domains = self._domain_ids("train", self.train, self.train_domains)
            self.test_domains = self._domain_ids("test", self.test, self.test_domains)

    def _domain_ids(self, split_name: str, split: ImageSource, ids: np.ndarray | None) -> np.ndarray:
        assert self.domain_names is not None
        ids = np.asarray(ids)
        if ids.shape != (len(split),) or not (len(ids) == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise DataError(
                f"{self.name}: {split_name}_domains must hold one integer domain id per image "
                f"({len(split)}), got shape {ids.shape} of {ids.dtype}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.domain_names)):
            raise DataError(
                f"{self.name}: {split_name}_domains span [{ids.min()}, {ids.max()}] but there are "
                f"{len(self.domain_names)} domain names"
            )
        return ids.astype(np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def domain_indices(self, split_name: str, domain: str) -> np.ndarray:
        """Indices of the ``split_name`` (``train``/``test``) images of ``domain``."""
        if self.domain_names is None or domain not in self.domain_names:
            raise DataError(f"{self.name}: no domain {domain!r} (domains: {self.domain_names})")
        ids = self.train_domains if split_name == "train" else self.test_domains
        assert ids is not None
        return np.flatnonzero(ids == self.domain_names.index(domain))


class TaskDataset(Dataset):
    """The images of some classes, transformed, with labels remapped to class-order positions.

    Args:
        images: the split to draw from.
        indices: which images belong to this view.
        label_map: ``label_map[original_label]`` = position of the class in the class order.
        transform: maps a uint8 ``[3,H,W]`` tensor to the model input (or, with ``batch_transform``, to a
            uint8 image that collates).
        batch_transform: completes ``transform`` on whole batches (``transform.on_device``); ``None``: the
            items are model inputs already.
    """

    def __init__(
        self,
        images: ImageSource,
        indices: Sequence[int] | np.ndarray,
        label_map: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = label_map[images.labels[self.indices]]
        self.transform = transform
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.image(int(self.indices[k]))), int(self.targets[k])
