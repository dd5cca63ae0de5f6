"""Head runs: fit a registered head on an embedding store, and load one back as a HeadModel.

A head run has exactly the CNN run format (klgrade.rundir): config.yaml (``kind: head``),
checkpoint.pt (a dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``),
history.csv, predictions_<split>.csv and metrics_<split>.json.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from klgrade import io
from klgrade.heads.base import HeadConfig, get_head
from klgrade.rundir import RunError, write_predictions

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "klgrade-head"
# Store-meta fields a head depends on: copied into the checkpoint so that a run can rebuild (and
# verify) the very backbone that made its training vectors.
STORE_FIELDS = ("backbone", "features", "dim", "weights", "weights_source", "weights_fingerprint", "seed",
                "preprocessing")


class HeadModel:
    """A fitted head plus its scaler and the store/backbone it expects; turns vectors (or images,
    through the same frozen backbone) into KL probabilities."""

    def __init__(self, ckpt: dict, run_dir: str | Path | None = None, config: dict | None = None,
                 device: str | None = None):
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{run_dir}: checkpoint.pt is not a klgrade head checkpoint")
        self.ckpt, self.run_dir, self.config = ckpt, run_dir, config or {}
        self.head = ckpt["head"]
        self.store = dict(ckpt["store"])
        self.mean = ckpt["scaler_mean"].numpy().astype(np.float32)
        self.scale = ckpt["scaler_scale"].numpy().astype(np.float32)
        self._device = device
        self._embedder = None
        self.kind = get_head(self.head)
        self._layers = self.kind.torch_layers(ckpt)  # built once: predict_proba runs per batch

    def torch_layers(self):
        """The head as torch layers (standardised vectors -> logits), or None (e.g. trees)."""
        return self._layers

    @property
    def backbone(self) -> str:
        return self.store["backbone"]

    @property
    def input_size(self) -> int:
        """Side of the uint8 square view (klgrade.view.entrance.square_view) the backbone takes."""
        return int(self.store["preprocessing"]["input_size"])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, dim) raw embeddings -> (N, 5) probabilities."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.mean):
            raise ValueError(f"head expects (N, {len(self.mean)}) vectors, got {X.shape}")
        Z = (X - self.mean) / self.scale
        if self._layers is not None:
            with torch.inference_mode():
                return torch.softmax(self._layers(torch.from_numpy(Z)).float(), 1).numpy().astype(np.float64)
        return self.kind.predict_proba(self.ckpt, Z)

    def embedder(self, device: str | None = None):
        """The frozen backbone that made the training vectors, rebuilt and verified by fingerprint."""
        if self._embedder is None:
            from klgrade.embed.embedders import build_embedder

            s = self.store
            emb = build_embedder(s["backbone"], weights=s.get("weights", "auto"), features=s["features"],
                                 device=device or self._device, seed=int(s.get("seed", 0)))
            if emb.fingerprint != s["weights_fingerprint"]:
                raise RunError(f"{self.run_dir}: the {s['backbone']} weights found now ({emb.weights_source}, sha1 "
                               f"{emb.fingerprint[:12]}) differ from those the head was trained on "
                               f"({s.get('weights_source')}, sha1 {s['weights_fingerprint'][:12]})")
            self._embedder = emb
        return self._embedder

    def predict_views(self, views: np.ndarray, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """uint8 (N, S, S) square views (S = ``input_size``) -> (N, 5) probabilities."""
        views = np.asarray(views)
        if views.ndim == 2:
            views = views[None]
        return self.predict_proba(self.embedder().embed_views(views, batch_size=batch_size, progress=progress))

    def predict_paths(self, paths, batch_size: int = 32) -> np.ndarray:
        """Image files -> (N, 5) probabilities (views made by klgrade.view.entrance.load_view)."""
        from klgrade.view.entrance import load_view

        return self.predict_views(np.stack([load_view(p, self.input_size) for p in paths]), batch_size)


def load_head_run(run_dir: str | Path, device: str | None = None) -> HeadModel:
    """Load a head run (config.yaml with ``kind: head`` + checkpoint.pt) for prediction."""
    from klgrade.rundir import read_config

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("kind") != "head":
        raise RunError(f"{run_dir}: not an embedding-head run (kind: {config.get('kind')!r})")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise RunError(f"{run_dir}: no checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, whatever the cause
        raise RunError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    return HeadModel(ckpt, run_dir, config, device=device)


def predict_views(run: str | Path | HeadModel, views: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grade uint8 square views with a head run (path or loaded model): (N, 5) probabilities."""
    model = run if isinstance(run, HeadModel) else load_head_run(run)
    return model.predict_views(views, batch_size=batch_size)


def _split_parts(data: str | Path, cfg: HeadConfig) -> tuple[dict[str, pd.DataFrame], str]:
    """The manifest's train/val/test rows (val: the manifest's, else a patient-level hold-out of
    train) and where val came from."""
    from klgrade.ingest.manifest import read_manifest
    from klgrade.ingest.splits import holdout_split

    df = read_manifest(data)
    root = df.attrs["root"]
    df = df[df["split"] != ""].copy()
    val_source = "manifest"
    if not (df["split"] == "val").any():
        df = holdout_split(df, cfg.val_fraction, seed=cfg.seed)
        val_source = f"holdout {cfg.val_fraction:g} of train (patient-level, seed {cfg.seed})"
    parts = {s: df[df["split"] == s].copy() for s in ("train", "val", "test")}
    for p in parts.values():
        p.attrs["root"] = root
    if parts["train"].empty or parts["val"].empty:
        raise RunError(f"{data}: need train and val images (train {len(parts['train'])}, val {len(parts['val'])})")
    return parts, val_source


def fit_head(embeddings: str | Path, data: str | Path, out: str | Path, cfg: HeadConfig | None = None,
             name: str | None = None, overwrite: bool = False) -> dict:
    """Fit a head on store ``embeddings`` with the labels/splits of dataset ``data``; write run ``out``.

    Returns {split: metrics} for the splits predicted (val, and test when the manifest has one).
    """
    from klgrade.embed.store import open_store

    cfg = cfg or HeadConfig()
    get_head(cfg.head).check_available()  # an unknown head or a missing extra fails before any work
    out = Path(out)
    if (out / "config.yaml").exists() and not overwrite:
        raise RunError(f"{out}: already holds a run; choose another --out (or --overwrite)")
    store = open_store(embeddings)
    parts, val_source = _split_parts(data, cfg)
    X = {s: store.vectors_for(p, data) for s, p in parts.items() if len(p)}
    y = {s: p["klg"].to_numpy(dtype=np.int64) for s, p in parts.items() if len(p)}
    mean = X["train"].mean(0)
    scale = X["train"].std(0)
    scale[scale < 1e-6] = 1.0  # constant features stay 0 instead of blowing up
    Z = {s: ((x - mean) / scale).astype(np.float32) for s, x in X.items()}
    t0 = time.perf_counter()
    head_ckpt, history = get_head(cfg.head).fit(cfg, Z["train"], y["train"], Z["val"], y["val"])
    fit_seconds = time.perf_counter() - t0
    meta = store.meta
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "head": cfg.head,
            "store": {k: meta.get(k) for k in STORE_FIELDS},
            "scaler_mean": torch.from_numpy(mean.astype(np.float32)),
            "scaler_scale": torch.from_numpy(scale.astype(np.float32)), **head_ckpt}
    model = HeadModel(ckpt, out)
    config = {
        "kind": "head", "name": name or out.name, "head": cfg.head, "backbone": meta["backbone"],
        "features": meta["features"], "dim": int(meta["dim"]), "weights": meta.get("weights"),
        "weights_source": meta.get("weights_source"), "weights_fingerprint": meta["weights_fingerprint"],
        "embeddings": str(Path(embeddings).resolve()), "data": str(Path(data).resolve()), "seed": cfg.seed,
        "val_source": val_source, "n_images": {s: int(len(p)) for s, p in parts.items()},
        "head_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "fit_seconds": round(fit_seconds, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    io.write_yaml(out / "config.yaml", config)
    io.torch_save(out / "checkpoint.pt", ckpt)
    io.write_csv(out / "history.csv", history, float_format="%.6f")
    results = {}
    for s in ("val", "test"):
        if s in X:
            results[s] = write_predictions(out, s, parts[s], model.predict_proba(X[s]))
    log.info("%s head on %s: fitted in %.1f s; %s", cfg.head, meta["backbone"], fit_seconds,
             ", ".join(f"{s} QWK {m['qwk']:.3f}" for s, m in results.items()))
    return results
