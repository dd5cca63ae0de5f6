"""Load a trained CNN run and predict KL-grade probabilities on uint8 views.

The one inference API for CNN runs, used by ``klgrade evaluate`` and by the clinic side
(predict / serve / export / Grad-CAM) and robustness evaluation::

    loaded = load_cnn_run("runs/resnet18", device="auto")
    views = cached_views(paths, loaded.img_size)          # or load_view(path, loaded.img_size)
    probs = predict_views(loaded, views, tta="flip")     # (N, 5), rows sum to 1

Checkpoints are read with ``torch.load(weights_only=True)``: a run dir from elsewhere cannot run
code on load.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from klgrade.data.dataset import ViewBatches, make_loader, views_to_tensor
from klgrade.grades import N_GRADES
from klgrade.runs import RunError, read_config

__all__ = ["LoadedRun", "load_cnn_run", "predict_views", "predict_batches", "forward_probs",
           "views_to_tensor", "resolve_device", "read_checkpoint", "cpu_has_native_bf16",
           "use_channels_last", "choose_layout"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16): there bf16 autocast
    runs convolutions 2-3x faster than fp32; elsewhere it is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (fp16 on older ones) and on CPUs with native bf16;
    none on other CPUs, where mixed precision is slower than fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def use_channels_last(device: torch.device, amp_dtype: torch.dtype | None, wanted: bool = True) -> bool:
    """Channels-last pays off on GPUs and with oneDNN's bf16 kernels on the CPU (~30% faster)."""
    return wanted and (device.type == "cuda" or amp_dtype is not None)


def choose_layout(device: torch.device, model: torch.nn.Module, arch: str, img_size: int, batch: int,
                  train: bool, amp: bool = True, channels_last: bool = True, cache_dir=None,
                  recorded: dict | None = None) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels-last) for ``model`` on ``device``.

    GPUs: bf16 (fp16 on old ones) + channels-last. CPUs: whichever allowed layout measures fastest
    on this CPU (klgrade.train.precision), bf16 only where the CPU has it natively. ``recorded``
    (a run's resolved config) is reused as is, so a resumed run keeps its precision."""
    if recorded and "amp_dtype" in recorded and "channels_last" in recorded:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(recorded["amp_dtype"]))
        return dtype, bool(recorded["channels_last"])
    if device.type != "cpu":
        dtype = amp_dtype_for(device, amp)
        return dtype, use_channels_last(device, dtype, channels_last)
    from klgrade.train.precision import cpu_layout

    layout = cpu_layout(model, arch, img_size, batch, train, allow_bf16=amp_dtype_for(device, amp) is not None,
                        allow_channels_last=channels_last, cache_dir=cache_dir)
    return layout.amp_dtype, layout.channels_last


@dataclass
class LoadedRun:
    model: torch.nn.Module
    spec: object  # klgrade.models.registry.ModelSpec
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    config: dict
    device: torch.device
    run_dir: Path
    arch: str = ""
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    checkpoint_meta: dict = field(default_factory=dict)


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A klgrade checkpoint dict, loaded safely (weights_only) with a clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path.parent}: no {path.name} (training did not finish an epoch?)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or unsafe pickle: all the same to the user
        raise RunError(f"{path}: not a loadable klgrade checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunError(f"{path}: not a klgrade checkpoint (no 'model' state dict)")
    return ckpt


def load_cnn_run(run_dir: str | Path, device: str | torch.device = "auto",
                 checkpoint: str = "checkpoint.pt") -> LoadedRun:
    """Rebuild a CNN run's model from its config.yaml + checkpoint (best by validation QWK)."""
    from klgrade.models.cnn import build_model

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if cfg.get("kind", "cnn") != "cnn":
        raise RunError(f"{run_dir}: a '{cfg.get('kind')}' run, not a CNN run")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    ckpt = read_checkpoint(run_dir / checkpoint)
    model_name = ckpt.get("model_name", cfg.get("model"))
    # Architecture only: the trained weights come from the checkpoint, never from the hub.
    built = build_model(model_name, weights="none", num_classes=int(ckpt.get("num_classes", N_GRADES)))
    model = built.model
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise RunError(f"{run_dir / checkpoint}: weights do not fit '{model_name}' "
                       f"({str(e).splitlines()[0][:200]})") from e
    model.eval().to(dev)
    img_size = int(ckpt.get("img_size", cfg.get("img_size")))
    amp_dtype, channels_last = choose_layout(dev, model, ckpt.get("arch", built.arch), img_size,
                                             int(cfg.get("eval_batch_size", 64)), train=False,
                                             amp=bool(cfg.get("amp", True)),
                                             channels_last=bool(cfg.get("channels_last", True)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return LoadedRun(
        model=model, spec=built.spec, img_size=img_size,
        mean=tuple(ckpt.get("mean", built.mean)), std=tuple(ckpt.get("std", built.std)), config=cfg,
        device=dev, run_dir=run_dir, arch=ckpt.get("arch", built.arch),
        amp_dtype=amp_dtype, channels_last=channels_last,
        checkpoint_meta=meta,
    )


@torch.no_grad()
def forward_probs(model: torch.nn.Module, x: torch.Tensor, tta: str = "none",
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax probabilities (B,5) in float32; ``tta='flip'`` averages with the mirrored image."""
    if tta not in ("none", "flip"):
        raise ValueError(f"tta must be none or flip, got {tta!r}")
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        probs = torch.softmax(model(x).float(), dim=1)
        if tta == "flip":
            probs = (probs + torch.softmax(model(torch.flip(x, dims=[3])).float(), dim=1)) / 2
    return probs


@torch.no_grad()
def predict_batches(model: torch.nn.Module, batches: Iterable, mean, std, device: torch.device,
                    tta: str = "none", amp_dtype=None, channels_last: bool = False,
                    n: int | None = None, progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Probabilities for batches of ``(uint8 (B,S,S), labels, positions)`` (a ViewBatches loader),
    placed by position, so any batch order gives the same (N,5) array."""
    was_training = model.training
    model.eval()
    chunks, positions = [], []
    for views, _, pos in tqdm(batches, disable=not progress, desc=desc, unit="batch", leave=False):
        x = views_to_tensor(views, mean, std, device, channels_last=channels_last)
        # kept on the device until the end: a .cpu() per batch would make the CPU wait for each
        # forward instead of reading the next batch meanwhile
        chunks.append(forward_probs(model, x, tta, amp_dtype))
        positions.append(pos)
    model.train(was_training)
    if not chunks:
        return np.zeros((0, N_GRADES))
    probs = torch.cat(chunks).cpu().double().numpy()
    pos = torch.cat(positions).numpy()
    out = np.zeros((n if n is not None else len(pos), probs.shape[1]))
    out[pos] = probs
    return out


def predict_views(loaded: LoadedRun, views, batch_size: int = 64, tta: str = "none",
                  progress: bool = False, workers: int = 0) -> np.ndarray:
    """(N,5) probabilities for uint8 views (N,S,S) (numpy array, memmap or tensor), S = img_size."""
    if isinstance(views, torch.Tensor):
        views = views.cpu().numpy()
    views = np.asarray(views) if not isinstance(views, np.memmap) else views
    if views.ndim == 2:
        views = views[None]
    if views.dtype != np.uint8 or views.ndim != 3:
        raise ValueError(f"expected uint8 views (N,S,S), got {views.shape} {views.dtype}")
    if views.shape[1:] != (loaded.img_size, loaded.img_size):
        raise ValueError(f"views are {views.shape[1]}x{views.shape[2]} px but the run "
                         f"{loaded.run_dir} was trained at {loaded.img_size} px")
    ds = ViewBatches(views, np.arange(len(views)))
    loader = make_loader(ds, batch_size, shuffle=False, workers=workers,
                         pin_memory=loaded.device.type == "cuda")
    return predict_batches(loaded.model, loader, loaded.mean, loaded.std, loaded.device, tta,
                           loaded.amp_dtype, loaded.channels_last, n=len(views), progress=progress)
