"""A pretrain run dir as a backbone: the ONE loader behind ``build_model(name, weights=RUN_DIR)``
(hence ``klgrade train --weights RUN_DIR``, ``pretrain --init RUN_DIR``) and
``build_embedder(RUN_DIR)`` (hence ``klgrade embed --backbone RUN_DIR`` and every head fitted on it).

The run's ``checkpoint.pt`` holds the encoder's state dict without a classifier (built with
``num_classes=0``) plus its model name, arch, image size and normalisation; it is read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from klgrade.rundir import RunError, read_config

CONFIG, CHECKPOINT = "config.yaml", "checkpoint.pt"


@dataclass(frozen=True)
class PretrainBackbone:
    run_dir: Path
    name: str  # the run's display name
    model: str  # registry or timm name it was pretrained as
    arch: str
    img_size: int
    mean: tuple
    std: tuple
    method: str
    epoch: int
    state_dict: dict
    sha256: str  # of checkpoint.pt

    def source(self) -> dict:
        """What build_model records as its weights_source."""
        return {"kind": "pretrain", "source": str(self.run_dir), "name": self.name, "method": self.method,
                "epoch": self.epoch, "sha256": self.sha256}


def is_pretrain_run(path) -> bool:
    """True for a folder whose config.yaml says ``kind: pretrain``."""
    try:
        p = Path(str(path)).expanduser()
        if not (p / CONFIG).is_file():
            return False
        from klgrade import io

        cfg = io.read_yaml(p / CONFIG)
        return isinstance(cfg, dict) and cfg.get("kind") == "pretrain"
    except Exception:  # noqa: BLE001 - an unreadable folder or YAML is simply not a pretrain run
        return False


def load_pretrain_backbone(run_dir) -> PretrainBackbone:
    from klgrade.models.wheel_weights import sha256_file
    from klgrade.rundir import read_checkpoint

    run = Path(run_dir).expanduser().resolve()
    cfg = read_config(run)
    if cfg.get("kind") != "pretrain":
        raise RunError(f"{run} is a '{cfg.get('kind', '?')}' run, not a pretrain run")
    model = str(cfg.get("model"))
    if not (run / CHECKPOINT).is_file():
        raise RunError(f"{run}: the pretrain run has no {CHECKPOINT} yet (it has not finished an epoch)")
    ck = read_checkpoint(run / CHECKPOINT)
    return PretrainBackbone(
        run_dir=run, name=str(cfg.get("name") or run.name), model=str(ck.get("model_name", model)),
        arch=str(ck["arch"]), img_size=int(ck["img_size"]), mean=tuple(ck["mean"]), std=tuple(ck["std"]),
        method=str(ck.get("method", cfg.get("method"))), epoch=int(ck.get("epoch", 0)),
        state_dict=ck["model"], sha256=sha256_file(run / CHECKPOINT))


def same_arch(a: str, b: str) -> bool:
    """timm arch names with or without their pretrained tag (``resnet18`` == ``resnet18.a1_in1k``)."""
    return a.split(".")[0] == b.split(".")[0]


def build_from_run(name: str, arch: str, kwargs: dict, run_dir):
    """timm ``arch`` (with ``kwargs``: num_classes, drop rates) holding the run's encoder weights;
    only the classifier (absent from the run) starts fresh. Returns (model, weights_source)."""
    import timm

    pb = load_pretrain_backbone(run_dir)
    if not same_arch(pb.arch, arch):
        raise RunError(f"{pb.run_dir} was pretrained as '{pb.model}' ({pb.arch}), not '{name}' ({arch}): "
                       f"use --model {pb.model}, or leave --model out (the run names its model)")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    missing, unexpected = model.load_state_dict(pb.state_dict, strict=False)
    head = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ""
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [k for k in missing if not (heads and k.startswith(heads))]
    if missing or unexpected:
        raise RunError(f"{pb.run_dir / CHECKPOINT} does not fit '{arch}' (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    return model, pb.source()


def resolve_backbone(backbone: str, weights: str = "auto") -> tuple[str, str]:
    """``embed --backbone RUN_DIR`` -> (the run's model name, the run dir as absolute weights)."""
    pb_run = str(Path(backbone).expanduser().resolve())
    if weights not in ("auto", pb_run) and str(Path(weights).expanduser().resolve()) != pb_run:
        raise RunError(f"--backbone {backbone} is a pretrain run and brings its own weights; "
                       f"drop --weights {weights}")
    return str(read_config(pb_run)["model"]), pb_run


def model_for_weights(weights: str | None) -> tuple[str | None, str | None]:
    """``train --weights RUN_DIR``: (the run's model, the absolute run dir); (None, weights) otherwise."""
    if weights is None or not is_pretrain_run(weights):
        return None, weights
    return resolve_backbone(weights)
