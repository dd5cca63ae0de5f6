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

from klgrade.grades import N_GRADES
from klgrade.rundir import RunError, read_checkpoint, read_config
from klgrade.runs.device import choose_layout, resolve_device
from klgrade.view.batches import ViewBatches, make_loader, views_to_tensor

__all__ = ["LoadedRun", "load_cnn_run", "predict_views", "predict_batches", "forward_probs"]


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
    # eval() and train() set an attribute on every submodule (~0.3 ms for a ResNet18 per film):
    # skipped for a model already wholly in eval mode, as a loaded run is.
    toggled = any(m.training for m in model.modules())
    if toggled:
        model.eval()
    chunks, positions = [], []
    for views, _, pos in tqdm(batches, disable=not progress, desc=desc, unit="batch", leave=False):
        x = views_to_tensor(views, mean, std, device, channels_last=channels_last)
        # kept on the device until the end: a .cpu() per batch would make the CPU wait for each
        # forward instead of reading the next batch meanwhile
        chunks.append(forward_probs(model, x, tta, amp_dtype))
        positions.append(pos)
    if toggled:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, N_GRADES))
    probs = torch.cat(chunks).cpu().double().numpy()
    pos = torch.cat(positions).numpy()
    out = np.zeros((n if n is not None else len(pos), probs.shape[1]))
    out[pos] = probs
    return out


def check_views(views, img_size: int, run_dir) -> np.ndarray:
    """uint8 (N, S, S) views as a numpy array (or memmap), S = ``img_size``; ValueError otherwise."""
    if isinstance(views, torch.Tensor):
        views = views.cpu().numpy()
    views = np.asarray(views) if not isinstance(views, np.memmap) else views
    if views.ndim == 2:
        views = views[None]
    if views.dtype != np.uint8 or views.ndim != 3:
        raise ValueError(f"expected uint8 views (N,S,S), got {views.shape} {views.dtype}")
    if views.shape[1:] != (img_size, img_size):
        raise ValueError(f"views are {views.shape[1]}x{views.shape[2]} px but the run "
                         f"{run_dir} was trained at {img_size} px")
    return views


def predict_module(module: torch.nn.Module, run, views: np.ndarray, tta: str = "none", batch_size: int = 64,
                   progress: bool = False, workers: int = 0) -> np.ndarray:
    """(N,5) probabilities of checked uint8 views through ``module`` with ``run``'s normalisation,
    device and layout (a LoadedRun or a klgrade.runs.Predictor)."""
    if 0 < len(views) <= batch_size and workers == 0 and not progress:
        # One batch (a film's knees in predict/serve): the batch predict_batches would make, without
        # a DataLoader, sampler and progress bar around it (~4% of a 2-view forward on a CPU).
        batch = (torch.from_numpy(np.array(views, dtype=np.uint8)), None, torch.arange(len(views)))
        return predict_batches(module, [batch], run.mean, run.std, run.device, tta, run.amp_dtype,
                               run.channels_last, n=len(views))
    ds = ViewBatches(views, np.arange(len(views)))
    loader = make_loader(ds, batch_size, shuffle=False, workers=workers, pin_memory=run.device.type == "cuda")
    return predict_batches(module, loader, run.mean, run.std, run.device, tta, run.amp_dtype, run.channels_last,
                           n=len(views), progress=progress)


def predict_views(loaded: LoadedRun, views, batch_size: int = 64, tta: str = "none",
                  progress: bool = False, workers: int = 0) -> np.ndarray:
    """(N,5) probabilities for uint8 views (N,S,S) (numpy array, memmap or tensor), S = img_size."""
    return predict_module(loaded.model, loaded, check_views(views, loaded.img_size, loaded.run_dir), tta,
                          batch_size, progress, workers)


def load_cnn_predictor(run_dir: Path, cfg: dict, name: str, device: str = "auto"):
    """The ``cnn`` run kind for klgrade.runs.load_run."""
    from klgrade.runs import Predictor

    loaded = load_cnn_run(run_dir, device=device)
    return Predictor(kind="cnn", name=name, run_dir=Path(run_dir), config=loaded.config, img_size=int(loaded.img_size),
                     mean=tuple(loaded.mean), std=tuple(loaded.std), device=loaded.device, module=loaded.model,
                     amp_dtype=loaded.amp_dtype, channels_last=bool(loaded.channels_last),
                     description=f"{loaded.config.get('model', '?')} ({loaded.arch or 'timm'}) CNN")
