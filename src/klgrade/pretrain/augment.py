"""Two random views of each canonical knee view, for self-supervised pretraining.

Batched on the device, randomness drawn on the CPU from a seeded generator (as
klgrade.augment.augment.Augment), so a resumed run sees the very views an uninterrupted one saw.

Geometry: a random resized crop whose window always contains the joint centre (the canonical
view puts it at (0.5, JOINT_ROW)), with a small rotation and a horizontal flip, in ONE bilinear
resampling. Natural-image recipes crop anywhere (8% of the area): on a knee view most such crops
show only bone shaft or soft tissue, and the views would agree on nothing KL grading needs.
Intensity: gamma, contrast, brightness, then blur and noise from
klgrade.augment.site_shift.SiteShiftAugment (the same kernels the supervised augmentation uses).
No colour jitter: the images are gray.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from klgrade.augment.site_shift import SiteShiftAugment
from klgrade.config import SiteShiftConfig
from klgrade.pretrain.config import SSLAugmentConfig
from klgrade.view.batches import to_device
from klgrade.view.canonical import JOINT_ROW

JOINT_XY = (0.0, 2 * JOINT_ROW - 1)  # the joint centre in grid units (align_corners=False)


def _u(n: int, lo, hi, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


class SSLAugment:
    def __init__(self, cfg: SSLAugmentConfig | None = None):
        self.cfg = cfg or SSLAugmentConfig()
        c = self.cfg
        self.site = SiteShiftAugment(SiteShiftConfig(p_blur=c.p_blur, blur_px=c.blur_px, p_noise=c.p_noise,
                                                     noise=c.noise))

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,1,S,S) float in [0,1] -> two independently augmented views of the same shape."""
        return self.view(x, g), self.view(x, g)

    def view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = self.crop(x, g)
        x = self.intensity(x, g)
        x = self.site.blur(x, g)
        return self.site.noise(x, g).clamp(0, 1)

    def crop_theta(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n,2,3) affine maps (output grid -> source grid): window, rotation, flip."""
        c = self.cfg
        scale = _u(n, c.crop_scale_min, 1.0, g)
        log_r = math.log(c.crop_ratio)
        ratio = torch.exp(_u(n, -log_r, log_r, g))
        half_w = torch.sqrt(scale * ratio).clamp(max=1.0)  # half-sizes in grid units (view = 1)
        half_h = torch.sqrt(scale / ratio).clamp(max=1.0)
        centre = []
        for half, joint in ((half_w, JOINT_XY[0]), (half_h, JOINT_XY[1])):
            # the joint inside the window (with a margin), the window inside the view
            reach = (1 - 2 * c.joint_margin) * half
            lo = torch.maximum(joint - reach, -1 + half)
            hi = torch.minimum(joint + reach, 1 - half)
            fallback = torch.clamp(torch.full_like(half, joint), -1 + half, 1 - half)
            lo, hi = torch.where(lo <= hi, lo, fallback), torch.where(lo <= hi, hi, fallback)
            centre.append(lo + torch.rand(n, generator=g) * (hi - lo))
        angle = _u(n, -c.rotate_deg, c.rotate_deg, g) * (math.pi / 180)
        flip = torch.where(torch.rand(n, generator=g) < c.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([
            torch.stack([cos * half_w * flip, -sin * half_h, centre[0]], dim=1),
            torch.stack([sin * half_w * flip, cos * half_h, centre[1]], dim=1),
        ], dim=1)

    def crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        theta = to_device(self.crop_theta(x.shape[0], g), x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def intensity(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c, n = self.cfg, x.shape[0]
        log_g = math.log(c.gamma)
        gamma = to_device(torch.exp(_u(n, -log_g, log_g, g)).view(n, 1, 1, 1), x)
        contrast = to_device(_u(n, 1 - c.contrast, 1 + c.contrast, g).view(n, 1, 1, 1), x)
        bright = to_device(_u(n, -c.brightness, c.brightness, g).view(n, 1, 1, 1), x)
        x = x.clamp(0, 1).pow(gamma)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean + bright).clamp(0, 1)
