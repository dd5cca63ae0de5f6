"""Batches of cached uint8 views for training/evaluation, as normalised tensors on the device.

The pipeline is: decode-once cache (klgrade.view.cache.cached_views, a uint8 memmap) -> one
fancy-index read per batch (no per-image Python work, no decoding) -> uint8 tensor moved to the
device -> float, augment (batched, on the device) -> replicate gray to 3 channels and normalise.
A data loader worker only copies bytes, so the model never waits for data.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler


class ViewBatches(Dataset):
    """Indexed by a *list* of positions (a BatchSampler's output) -> one whole batch:
    ``(uint8 tensor (B,S,S), int64 labels (B,), int64 positions (B,))``.

    ``rows`` selects the rows of ``views`` that make up this dataset (e.g. the train split).
    The memmap is reopened lazily in each worker process instead of being pickled (a pickled
    memmap would copy the whole array).
    """

    def __init__(self, views: np.ndarray, rows: Sequence[int], labels: Sequence[int] | None = None):
        self.filename = getattr(views, "filename", None)
        self._views = views
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = (np.asarray(labels, dtype=np.int64) if labels is not None
                       else np.full(len(self.rows), -1, dtype=np.int64))
        if len(self.labels) != len(self.rows):
            raise ValueError(f"{len(self.labels)} labels for {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.filename is not None:
            state["_views"] = None
        return state

    @property
    def views(self) -> np.ndarray:
        if self._views is None:
            self._views = np.load(self.filename, mmap_mode="r")
        return self._views

    def __getitem__(self, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64)
        rows = self.rows[pos]
        # Sorted reads walk the memmap forward (page-cache friendly); order is restored after.
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows),) + self.views.shape[1:], dtype=np.uint8)
        batch[order] = self.views[rows[order]]
        return torch.from_numpy(batch), torch.from_numpy(self.labels[pos]), torch.from_numpy(pos)


def make_loader(dataset: ViewBatches, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False, workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding whole batches. Shuffling uses a DistributedSampler (also when not
    distributed) so the order is a function of (seed, epoch) alone: call
    ``loader.sampler.sampler.set_epoch(epoch)`` -- see :func:`set_epoch` -- and a resumed run sees
    exactly the batches an uninterrupted one would have."""
    if shuffle or world_size > 1:
        base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                  seed=seed, drop_last=world_size > 1)
    else:
        base = SequentialSampler(dataset)
    # BatchNorm cannot train on a batch of one; drop a ragged last batch when there is a full one.
    drop = drop_last and len(base) >= batch_size
    sampler = BatchSampler(base, batch_size, drop_last=drop)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    base = getattr(loader.sampler, "sampler", None)
    if isinstance(base, DistributedSampler):
        base.set_epoch(epoch)


def normalize(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """(B,1,S,S) gray in [0,1] -> (B,3,S,S) replicated and normalised per channel with the
    weights' pretrained mean/std (see klgrade.models.cnn for why replicate). ``channels_last``:
    written straight into that layout (one pass instead of normalise + copy)."""
    m = to_device(torch.tensor(mean, dtype=x01.dtype), x01).view(1, -1, 1, 1)
    s = to_device(torch.tensor(std, dtype=x01.dtype), x01).view(1, -1, 1, 1)
    if not channels_last:
        return (x01 - m) / s
    b, _, h, w = x01.shape
    out = torch.empty(b, m.shape[1], h, w, device=x01.device, dtype=x01.dtype,
                      memory_format=torch.channels_last)
    return torch.addcmul(-m / s, x01, 1 / s, out=out)  # (x - m) / s


def views_to_tensor(views, mean: Sequence[float], std: Sequence[float], device="cpu",
                    channels_last: bool = False) -> torch.Tensor:
    """uint8 views (N,S,S) (numpy or tensor) -> normalised float model input (N,3,S,S) on ``device``."""
    t = views if isinstance(views, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(views))
    if t.dtype != torch.uint8 or t.ndim != 3:
        raise ValueError(f"expected uint8 views of shape (N,S,S), got {tuple(t.shape)} {t.dtype}")
    if torch.device(device).type == "cpu":
        return _normalize_numpy(t.numpy(), mean, std, channels_last)
    x = t.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    return normalize(x, mean, std, channels_last)


def _normalize_numpy(views: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     channels_last: bool) -> torch.Tensor:
    """``normalize`` of uint8 views on the CPU in NumPy, bit for bit: three small torch ops woke the
    OpenMP pool three times, 10-12 ms of CPU for a film's two views on 2 cores (the pool spins after
    each op) against ~1-2 ms here, one thread."""
    if channels_last:
        # (N, S, S, C) memory = (N, C, S, S) channels-last: one table lookup per pixel writes all
        # C channels at once (3-4x faster than computing them, for a batch as for a film)
        table = _channels_last_table(tuple(map(float, mean)), tuple(map(float, std)))
        return torch.from_numpy(np.take(table, views, axis=0)).permute(0, 3, 1, 2)
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    x01 = views.astype(np.float32) / np.float32(255.0)
    out = np.empty((len(views), len(m)) + views.shape[1:], np.float32)
    for c in range(len(m)):  # normalize's (x - m) / s in float32, one channel at a time
        out[:, c] = (x01 - m[c]) / s[c]  # (broadcasting over a 3-long axis is ~15x slower)
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=8)
def _channels_last_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(256, C) float32: what ``normalize`` (channels-last) gives each uint8 grey level, made by
    ``normalize`` itself on the 256 levels, so a lookup equals it bit for bit."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).float().div_(255.0)
    out = normalize(levels, mean, std, channels_last=True)  # (1, C, 16, 16), channels-last
    return out.permute(0, 2, 3, 1).reshape(256, len(mean)).numpy().copy()


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor (augmentation parameters, indices) onto ``like``'s device, floats in its
    dtype, without making the CPU wait for the GPU. A copy from pageable memory first waits for
    every kernel queued on the stream, so a few per batch serialised data preparation with the
    model step (H100, ResNet18 224 px: training 0.31x the images/s of the bare step); a copy from
    pinned memory with ``non_blocking`` is queued like a kernel."""
    if t.is_floating_point() and t.dtype != like.dtype:
        t = t.to(like.dtype)
    if like.device.type != "cuda":
        return t.to(like.device)
    return t.pin_memory().to(like.device, non_blocking=True)
