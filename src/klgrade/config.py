"""Typed configs as dataclasses, round-tripped through YAML.

A run is configured by (defaults) <- ``--config FILE.yaml`` <- command-line flags; the fully
resolved result is written to the run dir's ``config.yaml``, which is enough to rerun or resume it.
Unknown keys in a file are an error (a typo must not be silently ignored).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klgrade import io


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and the key."""


@dataclass
class SiteShiftConfig:
    """Ranges of :class:`klgrade.augment.site_shift.SiteShiftAugment` (probabilities per image; sizes relative to the view)."""

    p_geometry: float = 0.5
    zoom: float = 1.3  # log-uniform zoom in [1/zoom, zoom]: residual scale error of the canonical view
    translate: float = 0.06  # +- fraction of the view
    # framing that ends inside the view (edge continued, as the canonical view pads); 0.5 since a
    # 30% tighter framing raised grades with 0.3 (it still does: docs/robustness.md traces that to
    # the intensity standardisation, not to the continued edges)
    p_frame: float = 0.5
    frame_cut: float = 0.22  # up to this fraction cut from each side
    p_curve: float = 0.5
    gamma: float = 1.5  # log-uniform gamma in [1/gamma, gamma]
    contrast: float = 0.6  # max strength of an S/anti-S contrast curve
    p_blur: float = 0.3
    blur_px: float = 1.6  # max Gaussian sigma at 224 px (scaled with the view size)
    p_noise: float = 0.4  # noise alone raised grades (+0.25 on average) with 0.3
    noise: float = 0.04  # max noise sigma at mid-grey
    # max Gaussian sigma (px at 224 px) that correlates the noise into grain, as a film's noise looks
    # once the view has resampled it (lag-1 correlation ~0.4); 0 = independent pixels
    noise_grain: float = 0.0
    p_texture: float = 0.2
    texture: float = 0.06  # max amplitude of detector gain field / grid lines


@dataclass
class AugmentConfig:
    """Tensor augmentations applied on the device, per batch (see klgrade.augment.augment.Augment).

    Ranges are kept small so the anatomy stays plausible: a knee radiograph is acquired in a
    standard position, so large rotations or shears would teach the model images it never sees.
    """
    enabled: bool = True
    hflip: float = 0.5  # probability; left/right knees are mirror images of each other
    rotate_deg: float = 7.0  # +- degrees
    scale: float = 0.08  # +- relative zoom
    translate: float = 0.05  # +- fraction of the image size
    brightness: float = 0.08  # +- additive shift of [0,1] intensities
    contrast: float = 0.15  # +- relative contrast around the image mean
    gamma: float = 0.2  # log-uniform gamma in [1/(1+g), 1+g]
    site_shift: bool = True  # + klgrade.augment.site_shift.SiteShiftAugment (other sites' framing/contrast)
    site: SiteShiftConfig = field(default_factory=SiteShiftConfig)  # its ranges (saved with the run)


@dataclass
class TrainConfig:
    """Everything a CNN run needs; written to ``<run>/config.yaml`` fully resolved."""
    kind: str = "cnn"
    name: str | None = None
    data: str | None = None  # dataset dir (manifest.csv)
    model: str = "resnet18"  # registry name or any timm model name
    weights: str = "auto"  # auto | none | PATH
    img_size: int | None = None  # None -> the registry's input size
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # layer-wise LR decay for pretrained backbones: each block group towards the stem gets this factor
    # times the next one's LR (1.0 = off); keeps ImageNet features while the new head learns fast
    layer_decay: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 5.0  # max global grad norm (0 = off)
    loss: str = "sord"  # sord (soft ordinal labels) | ce | focal
    class_weights: str = "sqrt"  # sqrt | inverse | none: KL1 and KL4 are rare
    label_smoothing: float = 0.0  # ce / focal only
    sord_scale: float = 1.0  # sord: width of the soft labels (bigger = sharper)
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth (ConvNeXt)
    patience: int = 0  # stop after this many epochs without a better val QWK (0 = never)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader worker processes
    amp: bool = True  # mixed precision: bf16 on GPUs (fp16 + GradScaler on old ones) and bf16-capable CPUs
    channels_last: bool = True  # with amp or on GPU
    val_fraction: float = 0.1  # patient-level hold-out of train when the manifest has no 'val'
    tta: str = "flip"  # none | flip: for the predictions written at the end of training
    eval_batch_size: int = 64
    cache_dir: str | None = None  # decode cache (default $KLGRADE_CACHE or ~/.cache/klgrade)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str = "config") -> TrainConfig:
        checks = [
            (self.kind == "cnn", f"kind must be 'cnn' for a CNN run, got {self.kind!r}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 < self.layer_decay <= 1, "layer_decay must lie in (0, 1]"),
            (self.img_size is None or self.img_size >= 16, "img_size must be >= 16"),
            (0 < self.val_fraction < 1, "val_fraction must lie in (0, 1)"),
            (self.loss in ("sord", "ce", "focal"), f"loss must be sord, ce or focal, got {self.loss!r}"),
            (self.class_weights in ("sqrt", "inverse", "none"),
             f"class_weights must be sqrt, inverse or none, got {self.class_weights!r}"),
            (self.tta in ("none", "flip"), f"tta must be none or flip, got {self.tta!r}"),
            (self.workers >= 0, "workers must be >= 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError(f"{where}: " + "; ".join(bad))
        return self


# the heads `fit-head` offers (klgrade.heads registers one class per name; a test keeps them equal):
# kept here so the CLI lists them without importing torch
HEAD_KINDS = ("mlp", "linear", "xgboost")


@dataclass
class HeadConfig:
    """Everything a head run needs (klgrade.heads); written to its config.yaml."""
    head: str = "mlp"
    seed: int = 0
    balance: bool = True  # class-balanced loss / sample weights
    val_fraction: float = 0.1  # patient-level hold-out of train when the manifest has no val split
    # mlp
    hidden: tuple[int, ...] = (256, 64)
    dropout: float = 0.3
    epochs: int = 40
    patience: int = 6
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    device: str = "cpu"
    # linear: C grid searched on validation QWK unless one C is given
    C: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_iter: int = 50  # L-BFGS iterations per C
    # xgboost
    n_estimators: int = 500
    max_depth: int = 4
    learning_rate: float = 0.1
    early_stopping_rounds: int = 30


# Named starting points for `klgrade train --recipe` (flags override them). "scratch" is the
# built-in default; "finetune" is the recipe measured best for ImageNet-pretrained backbones on
# kneeKL224 (README, "The study's answer"): the new head learns at 1e-3 while layer-wise decay 0.8
# keeps the stem's features, half an epoch of warm-up, dropout before the head, 16 epochs. Its noise
# augmentation covers a film's noise as the view passes it on (sigma ~0.052, grainy; docs/robustness.md):
# the ImageNet-initialised network lost 0.065 QWK under that noise with the scratch ranges. It is drawn
# in 70% of images, not 40%: on the patient-level hold-out both seeds at 0.4 lost > 0.05 under a
# shift (0.069, 0.070), both at 0.7 did not (0.047, 0.049), at the same QWK under shift.
RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {},
    "finetune": {"lr": 1e-3, "layer_decay": 0.8, "warmup_epochs": 0.5, "drop_rate": 0.2, "epochs": 16,
                 "augment.site.noise": 0.07, "augment.site.noise_grain": 1.0, "augment.site.p_noise": 0.7},
}


def recipe_config(name: str) -> TrainConfig:
    """The TrainConfig of a named recipe (ConfigError naming the known ones)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return apply_overrides(TrainConfig(), RECIPES[name], where=f"recipe {name}").validate(f"recipe {name}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str, where: str):
    """Check/convert a YAML scalar to the field's declared type (int -> float is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where=where, prefix=f"{key}.")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if tp is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)  # lists of strings (e.g. a pretrain run's datasets)
    raise ConfigError(f"{where}: '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from a dict; unknown keys and wrong types raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; "
                          f"known: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], prefix + k, where) for k, v in data.items()}
    return cls(**kwargs)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_train_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """A settings file as a TrainConfig; the keys it gives override ``base`` (default: the
    built-in defaults), nested sections key by key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = io.read_yaml(path) or {}
    except Exception as e:  # noqa: BLE001 - any YAML error is reported the same way
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    data.pop("resolved", None)  # a run's config.yaml can seed a new run: drop what it found out
    if base is not None:
        data = _merged(to_dict(base), data)
    return from_dict(TrainConfig, data, where=str(path)).validate(str(path))


def apply_overrides(cfg, overrides: dict, where: str = "command line"):
    """Return a copy of ``cfg`` with non-None ``overrides`` applied; 'augment.rotate_deg' style keys
    reach nested configs."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(type(cfg), data, where=where)


def save_config(cfg, path: str | Path, extra: dict | None = None) -> None:
    """Write the resolved config (plus ``extra`` facts such as the resolved image size) atomically."""
    data = to_dict(cfg)
    if extra:
        data.update(extra)
    io.write_yaml(path, data)
