"""Label-free monitoring of a pretraining run, every epoch.

- RankMe (Garrido et al., ICML 2023): the effective rank exp(H(p)) of the embeddings' normalised
  singular values on a fixed subset of the pretraining images. A collapsing run (every image to the
  same few directions) shows at once as a falling rank; the loss alone does not say it.
- When a dataset has a labelled val split: kNN QWK (cosine, k neighbours, distance-weighted) of val
  images against labelled train images, via klgrade.evaluate.metrics.qwk. The val images are
  never trained on; they only watch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from klgrade.view.batches import views_to_tensor


def rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """Effective rank of an (N, D) embedding matrix (1 = collapsed, min(N, D) = isotropic)."""
    s = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = s / (s.sum() + eps) + eps
    return float(np.exp(-(p * np.log(p)).sum()))


@torch.no_grad()
def embed(encoder: torch.nn.Module, views: np.ndarray, mean, std, device: torch.device,
          amp_dtype=None, channels_last: bool = False, batch_size: int = 128) -> np.ndarray:
    """Pooled features of uint8 (N,S,S) views, the encoder in eval mode (its mode restored after)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in range(0, len(views), batch_size):
            x = views_to_tensor(np.array(views[start:start + batch_size]), mean, std, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(encoder(x).float().cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class MonitorSet:
    """Fixed views to watch: ``rank_views`` for RankMe; optional labelled kNN reference and val."""

    rank_views: np.ndarray
    ref_views: np.ndarray | None = None
    ref_labels: np.ndarray | None = None
    val_views: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    k: int = 20

    @property
    def has_knn(self) -> bool:
        return self.val_views is not None and len(self.val_views) > 0 and len(np.unique(self.ref_labels)) > 1

    def measure(self, encoder, mean, std, device, amp_dtype=None, channels_last=False) -> dict:
        def emb(v):
            return embed(encoder, v, mean, std, device, amp_dtype, channels_last)

        row = {"rankme": rankme(emb(self.rank_views))}
        if self.has_knn:
            row["knn_qwk"] = knn_qwk(emb(self.ref_views), self.ref_labels, emb(self.val_views),
                                     self.val_labels, self.k)
        return row


def knn_qwk(ref: np.ndarray, ref_y: np.ndarray, query: np.ndarray, query_y: np.ndarray, k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    from klgrade.evaluate.metrics import qwk

    knn = KNeighborsClassifier(n_neighbors=min(k, len(ref)), metric="cosine", weights="distance")
    knn.fit(ref, ref_y)
    return qwk(query_y, knn.predict(query))
