"""Frozen foundation-model image towers (the study's approach 3 and peers).

``build_embedder(name, weights, features)`` builds ONLY the image tower of a registry embedder plus
its preprocessing, and returns an :class:`Embedder` that maps the uint8 square views made by
``klgrade.view.entrance.square_view`` to vectors.

Weights (``weights=``): ``"auto"`` — the hub when online, the local hub cache when offline
(``HF_HUB_OFFLINE``); ``PATH`` — a checkpoint file or a folder in the hub's own layout (for
open_clip models ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``/``.safetensors``;
for transformers models a ``save_pretrained`` folder); ``"none"`` — seeded random initialisation.
Weights that cannot be had raise :class:`klgrade.models.registry.WeightsError`; never a silent
fallback.

open_clip models are never built whole: BioMedCLIP's text tower is a HF BERT whose construction
would ask the hub for its config and tokenizer, so we read ``model_cfg["vision_cfg"]`` and
``embed_dim`` from ``open_clip_config.json``, build open_clip's vision tower and load only the
checkpoint's ``visual.*`` tensors.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from klgrade.models.registry import REGISTRY, WeightsError, get_spec
from klgrade.view.cache import CACHE_VERSION

log = logging.getLogger(__name__)

FEATURES = ("proj", "pre")
# How the view is made, in the store's preprocessing record: it names the view code's version, so a
# store made with an older canonical view is refused (the version changes whenever the views do).
VIEW_RECIPE = f"canonical_view, view version {CACHE_VERSION}, uint8"

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Embedder:
    """An image tower in eval mode plus the preprocessing it expects."""

    backbone: str
    module: nn.Module  # normalised (B, 3, S, S) float -> (B, dim)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    features: str
    weights: str  # as requested: auto | none | PATH
    weights_source: str  # what was actually loaded (file, hub id) or "random-init"
    seed: int = 0
    device: str = "cpu"
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """sha1 over the tower's tensors: identifies exactly the weights used, whatever their source."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.module)
        return self._fingerprint

    def preprocessing(self) -> dict:
        return {
            "view": VIEW_RECIPE,
            "input_size": int(self.input_size),
            "channels": "gray replicated to 3",
            "scale": "1/255",
            "mean": [round(float(m), 8) for m in self.mean],
            "std": [round(float(s), 8) for s in self.std],
            "features": self.features,
        }

    def to(self, device: str) -> Embedder:
        self.module.to(device)
        self.device = str(device)
        return self

    def normalize(self, views: np.ndarray):
        """uint8 (B, S, S) views -> normalised float (B, 3, S, S) tensor on the embedder's device."""
        if views.ndim != 3 or views.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(f"{self.backbone} expects (B, {self.input_size}, {self.input_size}) views, "
                             f"got {tuple(views.shape)}")
        # copy: cached views are a read-only memmap, which torch.from_numpy cannot wrap safely
        x = torch.from_numpy(np.array(views, dtype=np.uint8)).to(self.device, non_blocking=True)
        x = x.float().div_(255.0).unsqueeze(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # broadcasting replicates the gray channel to 3

    def forward(self, x):
        return self.module(x)

    def embed_views(self, views: np.ndarray, batch_size: int = 32, progress: bool = False, bar=None,
                    world: int = 1) -> np.ndarray:
        """Embed uint8 (N, S, S) views; returns float32 (N, dim). ``bar``: an outer tqdm to advance
        (by ``world`` x the batch, as every process advances alike under torchrun)."""
        from tqdm import tqdm

        own = bar is None
        if own:
            bar = tqdm(total=len(views), disable=not progress, desc=f"embedding ({self.backbone})", unit="img")
        out = np.empty((len(views), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(views), batch_size):
                x = self.normalize(np.asarray(views[start : start + batch_size]))
                out[start : start + len(x)] = self.forward(x).float().cpu().numpy()
                bar.update(len(x) * world)
        if own:
            bar.close()
        return out


def state_fingerprint(module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def default_device() -> str:
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{local}" if local is not None else "cuda"
    return "cpu"


def build_embedder(backbone: str, weights: str = "auto", features: str = "proj", device: str | None = None,
                   seed: int = 0) -> Embedder:
    """Build ``backbone``'s image tower with its preprocessing. See the module docstring for ``weights``.
    ``backbone`` may be a `klgrade pretrain` run dir: its model, with the run as its weights."""
    from klgrade.models.pretrain_weights import is_pretrain_run, resolve_backbone

    if is_pretrain_run(backbone):
        backbone, weights = resolve_backbone(backbone, str(weights))
    spec = get_spec(backbone)
    if spec.kind == "cnn" and spec.name not in REGISTRY and not _is_timm_name(backbone):
        from klgrade.models.registry import list_models

        known = ", ".join(s.name for s in list_models())
        raise ValueError(f"'{backbone}' is neither a registry backbone nor a timm model (known: {known})")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    weights = str(weights)
    if weights not in ("auto", "none", "wheel") and not Path(weights).exists():
        raise WeightsError(backbone, f"--weights {weights}: no such file or folder")
    builders = {"open_clip": _build_open_clip, "timm": _build_timm, "transformers": _build_transformers}
    torch.manual_seed(seed)  # random init (weights none) is reproducible; loaded weights overwrite it
    emb = _build_cnn(spec, weights, features) if spec.kind == "cnn" else builders[spec.library](spec, weights, features)
    emb.seed = seed
    if emb.weights_source == "random-init":
        emb.weights_source = f"random-init (seed {seed})"
    emb.module.eval().requires_grad_(False)
    return emb.to(device or default_device())


# --------------------------------------------------------------------------------------- loading
def _hub_file(spec, repo: str, filenames: tuple[str, ...]) -> Path:
    """First of ``filenames`` found in ``repo`` (hub when online, local cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last = None
    for fn in filenames:
        try:
            return Path(hf_hub_download(repo, fn))
        except LocalEntryNotFoundError as e:  # offline, or no connection, and not cached
            last = e
        except EntryNotFoundError as e:  # online, the repo lacks this file name: try the next
            last = e
        except Exception as e:  # noqa: BLE001 - network/auth errors all mean "cannot get it"
            raise WeightsError(spec.name, f"cannot fetch {repo}/{fn} from the hub ({type(e).__name__}: {e})") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    where = ("HF_HUB_OFFLINE is set and the local hub cache " f"({_hf_cache()}) has no copy"
             if offline else "not on the hub or in the local cache")
    raise WeightsError(spec.name, f"{repo}: {' / '.join(filenames)} not found: {where} ({type(last).__name__})")


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return "~/.cache/huggingface/hub"


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def load_state_dict(path: Path, model: str) -> dict:
    """Tensors of a checkpoint file (.safetensors, or a torch pickle loaded with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means this file is not usable weights
        raise WeightsError(model, f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(model, f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(module, sd: dict, model: str, path: Path) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(model, f"{path}: weights do not fit the {model} image tower "
                                  f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                  f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")


# ------------------------------------------------------------------------------------- open_clip
def _open_clip_config(spec, weights: str) -> tuple[dict, Path | None, str]:
    """(config in open_clip_config.json layout, weights file or None, source description)."""
    import json

    builtin = spec.extra.get("open_clip_config")
    if builtin is None:  # an open_clip built-in architecture name (e.g. ViT-B-16)
        import open_clip

        model_cfg = open_clip.get_model_config(spec.arch)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config '{spec.arch}'")
        model_cfg = dict(model_cfg)
        if spec.extra.get("quick_gelu"):
            model_cfg["quick_gelu"] = True  # OpenAI weights were trained with QuickGELU
        builtin = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(spec.mean), "std": list(spec.std)}}
    if weights == "none":
        return copy.deepcopy(builtin), None, "random-init"
    if weights == "auto":
        if spec.extra.get("open_clip_config") is not None:
            cfg_file = _hub_file(spec, spec.hub_id, (OPEN_CLIP_CONFIG,))
            folder = cfg_file.parent
        else:
            folder = None
        wfile = _hub_file(spec, spec.hub_id, OPEN_CLIP_WEIGHTS)
        folder = folder or wfile.parent
    else:
        p = Path(weights)
        if p.is_file():
            return copy.deepcopy(builtin), p, str(p.resolve())
        folder = p
        wfile = _first_file(folder, OPEN_CLIP_WEIGHTS)
        if wfile is None:
            raise WeightsError(spec.name, f"{folder}: no {' or '.join(OPEN_CLIP_WEIGHTS)} in this folder")
    cfg_path = folder / OPEN_CLIP_CONFIG
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise WeightsError(spec.name, f"{cfg_path}: not valid JSON ({e})") from e
        if "model_cfg" not in cfg or "vision_cfg" not in cfg["model_cfg"]:
            raise WeightsError(spec.name, f"{cfg_path}: lacks model_cfg.vision_cfg")
    elif spec.extra.get("open_clip_config") is not None:
        raise WeightsError(spec.name, f"{folder}: no {OPEN_CLIP_CONFIG} next to the weights")
    else:
        cfg = copy.deepcopy(builtin)
    return cfg, wfile, (spec.hub_id if weights == "auto" else str(Path(weights).resolve()))


def _build_open_clip(spec, weights: str, features: str) -> Embedder:
    from open_clip.model import _build_vision_tower
    from open_clip.timm_model import TimmModel

    cfg, wfile, source = _open_clip_config(spec, weights)
    model_cfg = cfg["model_cfg"]
    vision_cfg = dict(model_cfg["vision_cfg"])
    image_size = vision_cfg.get("image_size", spec.input_size)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    # The text tower (text_cfg) is never read: only the image tower is built.
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    if isinstance(visual, TimmModel):
        # open_clip keeps the timm default size; a config that names another size means it.
        trunk_size = getattr(getattr(visual.trunk, "patch_embed", None), "img_size", None)
        if trunk_size is not None and tuple(trunk_size) != (image_size, image_size):
            visual.set_input_size(image_size)
    if wfile is not None:
        sd = load_state_dict(wfile, spec.name)
        vis = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
        if not vis:
            raise WeightsError(spec.name, f"{wfile}: no 'visual.*' tensors (not an open_clip checkpoint)")
        _load_into(visual, vis, spec.name, wfile)
    dim = int(model_cfg["embed_dim"])
    # Fingerprint the whole loaded tower before 'pre' drops the projection: same weights, same print.
    fingerprint = state_fingerprint(visual)
    if features == "pre":
        if isinstance(visual, TimmModel):
            visual.head = nn.Identity()
            dim = int(visual.trunk.num_features)
        elif getattr(visual, "proj", None) is not None:
            dim = int(visual.proj.shape[0])
            visual.proj = None
        else:
            raise ValueError(f"{spec.name}: this image tower has no projection, use --features proj")
    pre = cfg.get("preprocess_cfg", {})
    return Embedder(backbone=spec.name, module=visual, input_size=int(image_size),
                    mean=tuple(pre.get("mean", spec.mean)), std=tuple(pre.get("std", spec.std)), dim=dim,
                    features=features, weights=weights, weights_source=source, _fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------ timm
def _build_timm(spec, weights: str, features: str) -> Embedder:
    import timm

    if features == "pre":
        raise ValueError(f"{spec.name} has no projection head: --features pre applies to CLIP models; "
                         "use --features proj (the CLS token)")
    kwargs: dict = {"num_classes": 0}
    source = "random-init"
    if weights == "auto":
        kwargs["pretrained"] = True
        source = spec.hub_id or spec.arch
    elif weights != "none":
        p = Path(weights)
        f = p if p.is_file() else _first_file(p, HF_WEIGHTS + ("open_clip_pytorch_model.bin",))
        if f is None:
            raise WeightsError(spec.name, f"{p}: no {' or '.join(HF_WEIGHTS)} in this folder")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(f)})
        source = str(f.resolve())
    try:
        model = timm.create_model(spec.arch, **kwargs)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/file errors surface as a WeightsError with the cause
        if weights == "none":
            raise
        raise WeightsError(spec.name, f"loading {source} failed ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    cfg = model.pretrained_cfg
    return Embedder(backbone=spec.name, module=model, input_size=int(cfg.get("input_size", (3, spec.input_size))[-1]),
                    mean=tuple(cfg.get("mean", spec.mean)), std=tuple(cfg.get("std", spec.std)),
                    dim=int(model.num_features), features=features, weights=weights, weights_source=source)


# ------------------------------------------------------------------------------ CNN, frozen
def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".")[0])


def _build_cnn(spec, weights: str, features: str) -> Embedder:
    """Any CNN of the registry (or timm) as a frozen embedder: its globally pooled features, so the
    same network can be compared frozen (embedding + head) and fine-tuned end to end."""
    from klgrade.models.cnn import build_model

    if features == "pre":
        raise ValueError(f"{spec.name} is a CNN: its embedding is the pooled feature vector (--features proj)")
    built = build_model(spec.name, weights, num_classes=0)
    src = built.weights_source
    source = "random-init" if src["kind"] == "none" else f"{src['kind']}:{src['source']}"
    if src["kind"] == "pretrain":  # name the pretrain run: stores and head runs record it
        source = f"pretrain:{src['name']} ({src['method']}, epoch {src['epoch']}, {src['source']})"
    if "sha256" in src:
        source += f" (sha256 {src['sha256']})"
    return Embedder(backbone=spec.name, module=built.model, input_size=built.input_size, mean=built.mean,
                    std=built.std, dim=int(built.model.num_features), features=features, weights=weights,
                    weights_source=source)


# ---------------------------------------------------------------------------------- transformers
class _ClsPooler(nn.Module):
    """Wraps a HF vision model so forward returns its (layer-normed) CLS token."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).pooler_output


def _build_transformers(spec, weights: str, features: str) -> Embedder:
    from transformers import AutoConfig, AutoModel

    if features == "pre":
        raise ValueError(f"{spec.name} has no projection head: use --features proj (the CLS token)")
    if weights == "none":
        cfg_kwargs = spec.extra.get("hf_config")
        if cfg_kwargs is None:
            raise ValueError(f"{spec.name}: registry entry lacks extra['hf_config'] for random init")
        cfg_kwargs = dict(cfg_kwargs)
        config = AutoConfig.for_model(cfg_kwargs.pop("model_type"), **cfg_kwargs)
        model = AutoModel.from_config(config)
        source = "random-init"
    else:
        target = spec.hub_id if weights == "auto" else str(Path(weights))
        if weights != "auto" and not Path(weights).is_dir():
            raise WeightsError(spec.name, f"{weights}: expected a folder saved by transformers' save_pretrained "
                                          "(config.json + model.safetensors)")
        try:
            model = AutoModel.from_pretrained(target)
        except Exception as e:  # noqa: BLE001 - OSError/ValueError etc. all mean "weights unavailable"
            raise WeightsError(spec.name, f"{target}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        source = target if weights == "auto" else str(Path(weights).resolve())
    size = getattr(model.config, "image_size", spec.input_size)
    return Embedder(backbone=spec.name, module=_ClsPooler(model), input_size=int(size), mean=spec.mean,
                    std=spec.std, dim=int(model.config.hidden_size), features=features, weights=weights,
                    weights_source=source)
