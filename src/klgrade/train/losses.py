"""Losses for KL grading, which is ordinal (0 < 1 < ... < 4) and imbalanced (KL1 and KL4 are rare).

Every loss returns a 5-way logit model whose softmax is the p0..p4 of the run-dir format, so a
run's predictions look the same whatever loss trained it.

- ``sord``: soft ordinal labels (Diaz & Marathe, CVPR 2019): cross-entropy against
  q_k ∝ exp(-scale * (k - y)^2). Calling a KL2 knee KL3 costs less than calling it KL0, which is
  exactly what quadratic weighted kappa rewards, and argmax decoding still works.
- ``ce``: plain (optionally label-smoothed) cross-entropy.
- ``focal``: focal loss (gamma 2), down-weights easy examples.

Class weights (``sqrt`` by default) re-weight each sample by its true grade's weight; the batch
loss is the weighted mean, as in ``torch.nn.CrossEntropyLoss(weight=...)``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 5


def class_weights(labels, mode: str = "sqrt", n_classes: int = N_CLASSES) -> torch.Tensor:
    """Per-grade weights from training labels: ``inverse`` = N / (K n_c), ``sqrt`` = its square root
    (a milder correction that does not blow up KL4 on small data), ``none`` = ones."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(float)
    if mode == "none":
        return torch.ones(n_classes)
    inv = counts.sum() / (n_classes * np.maximum(counts, 1.0))
    if mode == "inverse":
        w = inv
    elif mode == "sqrt":
        w = np.sqrt(inv)
    else:
        raise ValueError(f"class weight mode must be sqrt, inverse or none, got {mode!r}")
    w[counts == 0] = 0.0  # a grade absent from training gets no weight (and no target mass)
    return torch.tensor(w, dtype=torch.float32)


def sord_targets(y: torch.Tensor, n_classes: int = N_CLASSES, scale: float = 1.0) -> torch.Tensor:
    ranks = torch.arange(n_classes, device=y.device, dtype=torch.float32)
    dist = (ranks[None, :] - y[:, None].float()) ** 2
    return torch.softmax(-scale * dist, dim=1)


class GradingLoss(nn.Module):
    def __init__(self, kind: str = "sord", weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, sord_scale: float = 1.0, focal_gamma: float = 2.0):
        super().__init__()
        if kind not in ("sord", "ce", "focal"):
            raise ValueError(f"loss must be sord, ce or focal, got {kind!r}")
        self.kind = kind
        self.label_smoothing = label_smoothing
        self.sord_scale = sord_scale
        self.focal_gamma = focal_gamma
        self.register_buffer("weights", weights if weights is not None else torch.ones(N_CLASSES))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # loss in fp32 even under autocast
        logp = F.log_softmax(logits, dim=1)
        n = logits.shape[1]
        if self.kind == "sord":
            target = sord_targets(y, n, self.sord_scale)
        else:
            target = F.one_hot(y, n).float()
            if self.label_smoothing:
                target = target * (1 - self.label_smoothing) + self.label_smoothing / n
        per_sample = -(target * logp).sum(dim=1)
        if self.kind == "focal":
            p_true = logp.gather(1, y[:, None]).squeeze(1).exp()
            per_sample = (1 - p_true) ** self.focal_gamma * per_sample
        w = self.weights[y]
        return (w * per_sample).sum() / w.sum().clamp_min(1e-12)


def make_loss(cfg, train_labels) -> GradingLoss:
    """The loss a TrainConfig asks for, with class weights from the training labels."""
    return GradingLoss(cfg.loss, class_weights(train_labels, cfg.class_weights),
                       label_smoothing=cfg.label_smoothing, sord_scale=cfg.sord_scale)
