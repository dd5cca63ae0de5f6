"""Settings of a self-supervised pretraining run (``klgrade pretrain``), round-tripped through YAML.

The resolved config is the run's ``config.yaml`` (``kind: pretrain``), enough to resume or rerun it;
command-line flags reach it through klgrade.config.apply_overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from klgrade import io
from klgrade.config import ConfigError, from_dict

METHODS = ("dino", "byol", "simclr")


@dataclass
class SSLAugmentConfig:
    """Two views per image (klgrade.pretrain.augment). Ranges suit radiographs: the crop keeps the
    joint in view, geometry stays near the standard acquisition, intensities change like exposure
    and detector do; no colour jitter (gray images) and no solarisation."""

    crop_scale_min: float = 0.35  # area fraction of the view kept by a random resized crop
    crop_ratio: float = 1.33  # aspect ratios in [1/r, r]
    joint_margin: float = 0.15  # the joint centre stays this far (fraction of the crop) inside it
    hflip: float = 0.5
    rotate_deg: float = 10.0
    gamma: float = 1.6  # log-uniform gamma in [1/g, g]
    contrast: float = 0.3  # +- relative contrast around the image mean
    brightness: float = 0.1
    p_blur: float = 0.4
    blur_px: float = 1.6  # max Gaussian sigma at 224 px (scaled with the view size)
    p_noise: float = 0.4
    noise: float = 0.04


@dataclass
class PretrainConfig:
    kind: str = "pretrain"
    name: str | None = None
    data: list = field(default_factory=list)  # dataset dirs (manifest.csv each); labels ignored
    splits: list = field(default_factory=lambda: ["train"])  # held-out discipline: train images only
    model: str = "efficientnet_lite0"
    init: str = "imagenet"  # imagenet | none | a pretrain RUN_DIR (or a weights PATH)
    method: str = "byol"
    epochs: int = 10
    img_size: int = 160
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 3.0
    # method heads (lightly): hidden and output widths; EMA momentum of BYOL/DINO (cosine to 1)
    hidden_dim: int = 1024
    proj_dim: int = 256
    dino_out_dim: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2  # SimCLR NT-Xent
    # label-free monitoring: RankMe on a fixed subset; kNN QWK when a labelled val split exists
    monitor_images: int = 512
    knn_k: int = 20
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    amp: bool = True
    channels_last: bool = True
    cache_dir: str | None = None
    augment: SSLAugmentConfig = field(default_factory=SSLAugmentConfig)

    def validate(self, where: str = "config") -> PretrainConfig:
        a = self.augment
        checks = [
            (self.kind == "pretrain", f"kind must be 'pretrain', got {self.kind!r}"),
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (contrastive and BatchNorm heads need pairs)"),
            (self.lr > 0, "lr must be > 0"),
            (self.img_size >= 16, "img_size must be >= 16"),
            (0 < a.crop_scale_min <= 1, "augment.crop_scale_min must lie in (0, 1]"),
            (0 <= a.joint_margin < 0.5, "augment.joint_margin must lie in [0, 0.5)"),
            (0 <= self.momentum < 1, "momentum must lie in [0, 1)"),
            (self.monitor_images >= 8, "monitor_images must be >= 8"),
            (bool(self.splits), "splits must name at least one split"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError(f"{where}: " + "; ".join(bad))
        return self

    @property
    def init_weights(self) -> str:
        """--init as klgrade.models.cnn.build_model's ``weights``."""
        return {"imagenet": "auto", "none": "none"}.get(self.init, self.init)


def load_pretrain_config(path: str | Path) -> PretrainConfig:
    data = io.read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    data.pop("resolved", None)
    return from_dict(PretrainConfig, data, where=str(path)).validate(str(path))
