"""The ``head`` run kind: an embedding head on its frozen backbone, as one grader.

MLP and linear heads become torch layers behind the backbone (frozen backbone -> standardise ->
head), so grading, Grad-CAM (through the backbone) and export work as for a CNN; their output
equals klgrade.heads.HeadModel's. Gradient-boosted trees have no gradient: they grade views
through HeadModel itself, without heatmaps or export.
"""
from __future__ import annotations

from pathlib import Path

import torch

from klgrade.rundir import RunError


class EmbeddingHeadNet(torch.nn.Module):
    """Normalised image (N, 3, S, S) -> frozen backbone -> (v - mean) / scale -> head -> logits."""

    def __init__(self, backbone, mean, scale, head):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("feat_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("feat_scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        return self.head((self.backbone(x).float() - self.feat_mean) / self.feat_scale)


def load_head_predictor(run_dir: Path, cfg: dict, name: str, device: str = "auto"):
    """klgrade.runs.load_run's loader for head runs."""
    from klgrade.heads import load_head_run
    from klgrade.runs import Predictor
    from klgrade.runs.device import resolve_device

    dev = resolve_device(device)
    head = load_head_run(run_dir, device=str(dev))
    try:
        emb = head.embedder(str(dev))  # rebuilt and checked against the training fingerprint
    except ValueError as e:
        raise RunError(f"{run_dir}: cannot rebuild the head's backbone ({e})") from e
    parts = dict(kind="head", name=name, run_dir=Path(run_dir), config=cfg, img_size=int(emb.input_size),
                 mean=tuple(emb.mean), std=tuple(emb.std), device=dev,
                 description=f"{head.backbone} embeddings + {head.head} head")
    net = head.torch_layers()
    if net is None:
        return Predictor(**parts, _predict=lambda views, batch_size: head.predict_views(views, batch_size=batch_size),
                         explain_unavailable=f"{head.head} head: trees have no gradient, Grad-CAM needs one")
    return Predictor(**parts, module=EmbeddingHeadNet(emb.module, head.mean, head.scale, net).eval().to(dev))
