"""Batches of cached uint8 views for training/evaluation, and augmentation on tensors.

The pipeline is: decode-once cache (klgrade.data.cache.cached_views, a uint8 memmap) -> one
fancy-index read per batch (no per-image Python work, no decoding) -> uint8 tensor moved to the
device -> float, augment (batched, on the device) -> replicate gray to 3 channels and normalise.
A data loader worker only copies bytes, so the model never waits for data.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler

from klgrade.config import AugmentConfig
from klgrade.data.transfer import to_device  # noqa: F401 - also its old home


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
    x = t.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    return normalize(x, mean, std, channels_last)


AugmentOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class Augment:
    """Batched augmentation of gray images (B,1,S,S) in [0,1], on whatever device they live.

    Random parameters are drawn on the CPU from the given generator, so results depend only on the
    seed, not on the device or on how many numbers other code drew. ``ops`` is an ordered list of
    ``op(x, generator) -> x``; a new augmentation is one more op appended to it. The geometric
    jitter and the site-shift framing (:class:`klgrade.data.site_shift.SiteShiftAugment`) share one
    resampling (:meth:`warp`): one interpolation blurs less, and on a CPU the second pass cost ~5%
    of a ResNet18 training step.
    """

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        self.site = None
        self.ops: list[AugmentOp] = []
        if self.cfg.enabled:
            if self.cfg.site_shift:
                from klgrade.data.site_shift import SiteShiftAugment

                self.site = SiteShiftAugment(self.cfg.site)
            self.ops = [self.warp, self.intensity] + ([self.site.photometric] if self.site else [])

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in self.ops:
            x = op(x, generator)
        return x

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    def jitter_theta(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n,2,3) affine maps (grid units): small rotation, zoom, translation, horizontal flip."""
        c = self.cfg
        angle = self._uniform(n, -c.rotate_deg, c.rotate_deg, g) * (math.pi / 180)
        zoom = self._uniform(n, 1 - c.scale, 1 + c.scale, g)
        t = self._uniform(2 * n, -c.translate, c.translate, g).view(n, 2) * 2  # grid units span 2
        flip = torch.where(torch.rand(n, generator=g) < c.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack([
            torch.stack([cos * flip, -sin, t[:, 0]], dim=1),
            torch.stack([sin * flip, cos, t[:, 1]], dim=1),
        ], dim=1)

    def warp(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The jitter of :meth:`jitter_theta`, after the site-shift framing when that is on, in one
        bilinear resampling. 'border' continues the edge tissue instead of pasting black corners."""
        n, _, h, w = x.shape
        theta = to_device(self.jitter_theta(n, g), x)
        if self.site is None:
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        else:
            # output pixel -> site framing coords v (separable) -> jittered source coords
            vx, vy = self.site.framing_coords(n, h, w, g)
            vx = to_device(vx, x).clamp(-1, 1).view(n, 1, w)
            vy = to_device(vy, x).clamp(-1, 1).view(n, h, 1)
            a = theta.view(n, 2, 3, 1, 1)
            grid = torch.stack([a[:, 0, 0] * vx + a[:, 0, 1] * vy + a[:, 0, 2],
                                a[:, 1, 0] * vx + a[:, 1, 1] * vy + a[:, 1, 2]], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def intensity(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Exposure-like changes: gamma, contrast around the image mean, brightness."""
        c = self.cfg
        n = x.shape[0]
        log_g = math.log1p(c.gamma)
        gamma = to_device(torch.exp(self._uniform(n, -log_g, log_g, g)).view(n, 1, 1, 1), x)
        contrast = to_device(self._uniform(n, 1 - c.contrast, 1 + c.contrast, g).view(n, 1, 1, 1), x)
        bright = to_device(self._uniform(n, -c.brightness, c.brightness, g).view(n, 1, 1, 1), x)
        x = x.clamp(0, 1).pow(gamma)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean + bright).clamp(0, 1)
