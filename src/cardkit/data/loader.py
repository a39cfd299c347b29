"""Seeded, resumable mini-batches from an in-memory uint8 dataset."""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from cardkit.data.augment import Augmentation
from cardkit.data.splits import ArrayDataset
from cardkit.distributed import World, shard_slice
from cardkit.errors import CardkitError

log = logging.getLogger(__name__)

# Share of free accelerator memory the uint8 images may take to be moved there once.
_DEVICE_SHARE = 0.25


class BatchLoader:
    """Yields (x float32 in [0, 1], N x C x H x W; y int64) batches on `device`.

    An epoch's order and augmentation depend only on its seed: the seed fixes a permutation and one
    augmentation seed per batch, so a run can resume at any batch and see exactly the same data.

    With `shard` (a data-parallel process), each batch is this rank's contiguous part of the global
    batch of `batch_size`, augmented with the global batch's random draws: the ranks together see
    exactly the batches of one process.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augmentation: Augmentation | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
        shard: World | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CardkitError(f"batch_size={batch_size!r} is not valid; give an integer >= 1")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augmentation = augmentation if augmentation is not None and augmentation.active else None
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.memory_format = memory_format  # the model's layout, so the training step needs no copy
        self.shard = shard if shard is not None and shard.size > 1 else None
        self._images, self._labels = _place(dataset, self.device)

    def __len__(self) -> int:
        n = len(self._labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def global_size(self, k: int) -> int:
        """The number of samples in global batch `k`, over all ranks."""
        return min((k + 1) * self.batch_size, len(self._labels)) - k * self.batch_size

    def epoch(self, seed: int | None = None, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start_batch` on.

        Seed None draws one from torch's global generator, but only for a shuffled or augmented epoch,
        so plain evaluation passes leave the global random state untouched.
        """
        if not 0 <= start_batch <= len(self):
            raise CardkitError(f"start_batch={start_batch} is outside 0..{len(self)}; give a batch index of this epoch")
        generator = torch.Generator().manual_seed(self._epoch_seed(seed))
        order = torch.randperm(len(self._labels), generator=generator) if self.shuffle else None
        batch_seeds = torch.randint(0, 2**62, (len(self),), generator=generator).tolist()
        for k in range(start_batch, len(self)):
            yield self._batch(order, k, batch_seeds[k])

    def _epoch_seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed
        random = self.shuffle or self.augmentation is not None
        return int(torch.randint(0, 2**62, (1,))) if random else 0

    def _batch(self, order: torch.Tensor | None, k: int, batch_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = k * self.batch_size, min((k + 1) * self.batch_size, len(self._labels))
        total, part = stop - start, slice(None)
        if self.shard is not None:
            part = shard_slice(total, self.shard.rank, self.shard.size)
            start, stop = start + part.start, start + part.stop
        if order is None:
            images, labels = self._images[start:stop], self._labels[start:stop]
        else:
            index = order[start:stop].to(self._images.device)
            images, labels = self._images[index], self._labels[index]
        x = images.to(self.device, non_blocking=True)
        if self.augmentation is not None:  # on uint8: a quarter of the memory traffic of float32
            x = self.augmentation(x, torch.Generator().manual_seed(batch_seed), part=part, total=total)
        # Transposing float is faster than uint8 here (vectorised), so convert first.
        x = x.float().div_(255.0).contiguous(memory_format=self.memory_format)
        return x, labels.to(self.device, non_blocking=True)


def _place(dataset: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset on `device` when it fits there, else on the CPU (pinned for fast copies to CUDA)."""
    images, labels = dataset.images, dataset.labels
    if device.type == "cpu":
        return images.cpu(), labels.cpu()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() > _DEVICE_SHARE * free:
            log.info("dataset of %d bytes stays in CPU memory; it does not fit on %s", images.numel(), device)
            return images.cpu().pin_memory(), labels.cpu().pin_memory()
    return images.to(device), labels.to(device)
