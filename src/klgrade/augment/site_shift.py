"""Controlled site shifts: how another hospital's knee images differ from OAI crops.

Two faces of the same idea:

* **Evaluation** -- :data:`SHIFTS` re-renders an image (from its original file) the way another
  site might have produced it: tighter or wider framing (zoom +-30%), off-centre framing, non-square
  crops, other contrast curves (gamma 0.6-1.6), blur, noise, 16-bit and RGB-encoded files.
  Each shift is deterministic (noise is seeded by the image), so every run sees the same images.
  ``klgrade robustness`` writes these re-renderings to files and sends them through the same
  canonical view the model uses (klgrade.view.entrance.load_view).
* **Training** -- :class:`SiteShiftAugment` applies random shifts of the same kinds to batches of
  canonical views (B,1,S,S), on the device. It imitates what is left *after* the canonical view:
  residual scale/centring errors, framings that end inside the view (their border continued, as the
  canonical view pads), contrast curves, blur, noise and detector texture.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from klgrade import io
from klgrade.config import SiteShiftConfig  # its ranges live with the other run settings

# --------------------------------------------------------------------------- evaluation shifts


def _reframe(img: np.ndarray, fov: float, dx: float = 0.0, dy: float = 0.0,
             aspect: float = 1.0, out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The image as a differently framed detector would see it.

    ``fov``: field of view relative to the original (1.3 = 30% wider, 0.77 = zoomed in);
    ``dx``/``dy``: frame centre offset as a fraction of the original width/height;
    ``aspect``: width/height of the new frame (its area kept at fov^2 of the original).
    Regions beyond the original file are unknown: the edge is continued (replicate), as
    the canonical view does. Output size: ``out_shape`` or the original size scaled by the aspect.
    """
    import cv2

    h, w = img.shape
    fw = fov * w * math.sqrt(aspect)
    fh = fov * h / math.sqrt(aspect)
    cx, cy = (w - 1) / 2 + dx * w, (h - 1) / 2 + dy * h
    if out_shape is None:
        out_shape = (max(16, round(h / math.sqrt(aspect))), max(16, round(w * math.sqrt(aspect))))
    oh, ow = out_shape
    sx, sy = fw / ow, fh / oh  # source px per output px
    # output pixel centre j -> source x = cx + (j - (ow-1)/2) * sx
    m = np.array([[sx, 0, cx - (ow - 1) / 2 * sx], [0, sy, cy - (oh - 1) / 2 * sy]], np.float64)
    src = img.astype(np.float32)
    if max(sx, sy) > 1.0:  # shrinking: low-pass first so the re-rendering does not alias
        src = ndimage.gaussian_filter(src, (0.45 * max(sy - 1, 0) + 1e-3, 0.45 * max(sx - 1, 0) + 1e-3))
    out = cv2.warpAffine(src, m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.clip(out, 0.0, 1.0)


def _seed_of(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Shift:
    """One controlled re-rendering. ``fn(img, rng) -> img`` works on 2-D float [0,1] arrays;
    ``encoding`` says how the result is stored: 'u8' (8-bit gray PNG), 'u16' (16-bit PNG using a
    12-bit sub-range) or 'rgb' (8-bit RGB PNG with three equal channels)."""

    name: str
    description: str
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    encoding: str = "u8"


def _gamma(g: float):
    return lambda img, rng: np.clip(img, 0, 1) ** g


def _blur(img, rng):
    # ~1.5 px at 224 px: a softer detector/processing, scaled with the image size
    return ndimage.gaussian_filter(img, 1.5 * max(img.shape) / 224.0, mode="nearest")


def _noise(img, rng):
    # quantum-like noise (grows with signal), sigma ~0.035 of the range at mid-grey
    n = rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img + 0.035 * np.sqrt(0.25 + img) * n, 0, 1)


def _identity(img, rng):
    return img


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("zoom_in_30", "30% tighter framing (field of view / 1.3)", lambda i, r: _reframe(i, 1 / 1.3)),
    Shift("zoom_out_30", "30% wider framing (field of view x 1.3)", lambda i, r: _reframe(i, 1.3)),
    Shift("off_centre", "frame centre moved 15% right and 12% down", lambda i, r: _reframe(i, 1.0, 0.15, 0.12)),
    Shift("aspect_wide", "non-square 1.85:1 frame (like 300x162 crops)",
          lambda i, r: _reframe(i, 1.0, aspect=1.85)),
    Shift("aspect_tall", "non-square 1:1.4 frame", lambda i, r: _reframe(i, 1.0, aspect=1 / 1.4)),
    Shift("gamma_0.6", "contrast curve gamma 0.6 (brighter)", _gamma(0.6)),
    Shift("gamma_1.6", "contrast curve gamma 1.6 (darker)", _gamma(1.6)),
    Shift("blur", "Gaussian blur, sigma 1.5 px per 224 px", _blur),
    Shift("noise", "signal-dependent noise, sigma ~0.035", _noise),
    Shift("bit16", "16-bit PNG holding a 12-bit range with an offset", _identity, "u16"),
    Shift("rgb", "8-bit RGB PNG with three equal channels", _identity, "rgb"),
)}


def shift_names(spec: str | None = "all") -> list[str]:
    """Parse ``all`` or a comma-separated list of shift names (error names the unknown ones)."""
    if spec is None or spec.strip() in ("", "all"):
        return list(SHIFTS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in SHIFTS]
    if bad:
        raise ValueError(f"unknown shift(s) {bad}; known: {', '.join(SHIFTS)} (or 'all')")
    return names


def apply_shift(img: np.ndarray, name: str, key: str = "") -> np.ndarray:
    """Re-render a 2-D float [0,1] image under shift ``name``; ``key`` (e.g. the image id) seeds
    the random parts, so the same image always gets the same noise."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    rng = np.random.default_rng(_seed_of(f"{name}|{key}"))
    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    return np.clip(SHIFTS[name].fn(img, rng), 0.0, 1.0).astype(np.float32)


def encode(img: np.ndarray, encoding: str = "u8") -> Image.Image:
    """A PIL image of a float [0,1] array in one of the stored encodings (see :class:`Shift`)."""
    img = np.clip(np.asarray(img, np.float32), 0, 1)
    if encoding == "u8":
        return Image.fromarray((img * 255 + 0.5).astype(np.uint8), mode="L")
    if encoding == "rgb":
        u8 = (img * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(np.stack([u8, u8, u8], axis=-1), mode="RGB")
    if encoding == "u16":
        # a detector that uses counts 300..3900 of 12 bits, stored in a 16-bit container
        u16 = (300 + img * 3600 + 0.5).astype(np.uint16)
        return Image.fromarray(u16)
    raise ValueError(f"unknown encoding {encoding!r} (u8, u16, rgb)")


def write_shifted(src: str | Path, name: str, dst: str | Path, key: str | None = None) -> Path:
    """Read ``src`` (any format read_image accepts), re-render it under shift ``name`` and write
    the result as a PNG at ``dst`` (atomically)."""
    from klgrade.ingest.images import read_image

    src, dst = Path(src), Path(dst)
    out = apply_shift(read_image(src), name, key if key is not None else src.stem)
    pil = encode(out, SHIFTS[name].encoding)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(dst) as tmp:
        pil.save(tmp, format="PNG")
    return dst


# --------------------------------------------------------------------------- training augmentation


def to_device(t, like):
    """klgrade.view.batches.to_device, imported late: the evaluation shifts above need no torch."""
    from klgrade.view.batches import to_device as move

    return move(t, like)


class SiteShiftAugment:
    """Random site shifts of a batch of canonical views (B,1,S,S) float in [0,1], on their device.

    Call as ``aug(x, generator)`` (the klgrade.augment.augment.Augment op signature); random numbers
    are drawn on the CPU from ``generator``, so results depend on the seed only.
    """

    def __init__(self, cfg: SiteShiftConfig | None = None):
        self.cfg = cfg or SiteShiftConfig()

    def __call__(self, x, generator):
        return self.photometric(self.geometry(x, generator), generator)

    def photometric(self, x, generator):
        """Contrast curve, blur, detector texture and noise (everything but the framing)."""
        x = self.curve(x, generator)
        x = self.blur(x, generator)
        x = self.texture(x, generator)
        x = self.noise(x, generator)
        return x.clamp(0, 1)

    @staticmethod
    def _u(n, lo, hi, g):
        import torch

        return torch.rand(n, generator=g) * (hi - lo) + lo

    @staticmethod
    def _on(n, p, g):
        import torch

        return torch.rand(n, generator=g) < p

    @staticmethod
    def _apply(x, on, fn):
        """``fn`` on the images selected by ``on`` only (the others pass untouched)."""
        idx = on.nonzero().squeeze(1)
        if len(idx) == 0:
            return x
        if len(idx) == len(on):
            return fn(x, idx)
        didx = to_device(idx, x)
        return x.index_copy(0, didx, fn(x.index_select(0, didx), idx))

    def framing_coords(self, n: int, h: int, w: int, g):
        """Where each output pixel samples the view (grid units, align_corners=False), separable:
        (n,w) x-coordinates and (n,h) y-coordinates. Zoom > 1 shows a smaller region (magnified);
        a frame ending inside the view clamps the coordinates to its window (= its edge continued,
        as the canonical view pads)."""
        import torch

        c = self.cfg
        on = self._on(n, c.p_geometry, g)
        lz = math.log(c.zoom)
        zoom = torch.where(on, torch.exp(self._u(n, -lz, lz, g)), torch.ones(n))
        t = torch.where(on[:, None], self._u(2 * n, -c.translate, c.translate, g).view(n, 2) * 2,
                        torch.zeros(n, 2))
        framed = self._on(n, c.p_frame, g)
        cuts = self._u(4 * n, 0, c.frame_cut, g).view(n, 4) * framed[:, None]  # left, right, top, bottom
        bx = (2 * torch.arange(w) + 1) / w - 1
        by = (2 * torch.arange(h) + 1) / h - 1
        vx = bx[None] / zoom[:, None] + t[:, :1]
        vy = by[None] / zoom[:, None] + t[:, 1:]
        vx = torch.minimum(torch.maximum(vx, -1 + 2 * cuts[:, :1]), 1 - 2 * cuts[:, 1:2])
        vy = torch.minimum(torch.maximum(vy, -1 + 2 * cuts[:, 2:3]), 1 - 2 * cuts[:, 3:])
        return vx, vy

    def geometry(self, x, g):
        """The framing of :meth:`framing_coords` alone (klgrade.augment.augment.Augment fuses it with
        its jitter into one resampling)."""
        import torch
        import torch.nn.functional as F

        n, _, h, w = x.shape
        vx, vy = self.framing_coords(n, h, w, g)
        grid = torch.empty(n, h, w, 2, device=x.device, dtype=x.dtype)
        grid[..., 0] = to_device(vx, x).view(n, 1, w)
        grid[..., 1] = to_device(vy, x).view(n, h, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def curve(self, x, g):
        import torch

        c, n = self.cfg, x.shape[0]
        on = self._on(n, c.p_curve, g)
        lg = math.log(c.gamma)
        gamma = torch.where(on, torch.exp(self._u(n, -lg, lg, g)), torch.ones(n)).view(n, 1, 1, 1)
        k = torch.where(on, self._u(n, -c.contrast, c.contrast, g), torch.zeros(n)).view(n, 1, 1, 1)
        gamma, k = to_device(gamma, x), to_device(k, x)

        def fn(xs, idx):
            d = to_device(idx, x)
            xs = xs.clamp(0, 1).pow(gamma[d])
            # S-curve (k>0) or flattening (k<0) around mid-grey, endpoints fixed: x + k x(1-x)(2x-1)
            return (xs - k[d] * xs * (1 - xs) * (1 - 2 * xs)).clamp(0, 1)
        return self._apply(x, on, fn)

    def blur(self, x, g):
        c, (n, _, h, w) = self.cfg, x.shape
        on = self._on(n, c.p_blur, g)
        sig = self._u(n, 0.3, c.blur_px, g) * (max(h, w) / 224.0) * on
        if not on.any():
            return x
        return self._apply(x, on, lambda xs, idx: _gaussian_each(xs, sig[idx]))

    def texture(self, x, g):
        import torch
        import torch.nn.functional as F

        c, (n, _, h, w) = self.cfg, x.shape
        on = self._on(n, c.p_texture, g)
        if not on.any():
            return x
        amp = self._u(n, 0, c.texture, g).view(n, 1, 1, 1)
        # a smooth detector gain field and faint anti-scatter grid lines
        # drawn small on the CPU (seeded), expanded on x's device: full-size work stays on the GPU
        field = torch.randn(n, 1, 4, 4, generator=g)
        period = self._u(n, 2.2, 5.0, g).view(n, 1, 1, 1)
        cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)

        def fn(xs, idx):
            f = F.interpolate(to_device(field[idx], x), size=(h, w), mode="bicubic", align_corners=False)
            lines = torch.sin(2 * math.pi * cols / to_device(period[idx], x))
            return xs * (1 + to_device(amp[idx], x) * (0.5 * f + 0.25 * lines))
        return self._apply(x, on, fn)

    def noise(self, x, g):
        import torch

        c, (n, _, h, w) = self.cfg, x.shape
        on = self._on(n, c.p_noise, g)
        if not on.any():
            return x
        sig = to_device(self._u(n, 0, c.noise, g).view(n, 1, 1, 1), x)
        # grain drawn only when asked for, so configs without it keep their random stream
        grain = self._u(n, 0, c.noise_grain, g) * (max(h, w) / 224.0) if c.noise_grain > 0 else None
        # a device generator seeded from the CPU one: reproducible, and no full-size CPU->GPU copy
        dev_gen = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))

        def fn(xs, idx):
            eps = torch.randn(xs.shape, generator=dev_gen, device=x.device, dtype=x.dtype)
            if grain is not None:  # correlated grain, rescaled to unit variance per image
                eps = _gaussian_each(eps, grain[idx])
                eps = eps / eps.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
            return xs + sig[to_device(idx, x)] * torch.sqrt(0.25 + xs.clamp(0, 1)) * eps
        return self._apply(x, on, fn)


def _gaussian_each(xs, sig):
    """Gaussian blur of each image of ``xs`` (m,1,H,W) with its own sigma ``sig`` (m,) in px
    (a CPU tensor; ~0 leaves the image as it is), edges replicated."""
    import torch
    import torch.nn.functional as F

    m = len(sig)
    r = max(1, int(math.ceil(3 * float(sig.max()))))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (ax[None] / sig.clamp_min(1e-3)[:, None]) ** 2)
    k = to_device(k / k.sum(1, keepdim=True), xs)  # (m, K)
    y = F.pad(xs.transpose(0, 1), (r, r, r, r), mode="replicate")  # (1,m,H,W): a group per image
    y = F.conv2d(y, k.view(m, 1, 1, -1), groups=m)
    y = F.conv2d(y, k.view(m, 1, -1, 1), groups=m)
    return y.transpose(0, 1)
