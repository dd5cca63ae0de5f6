"""Run dirs: the one format shared by CNN runs and embedding-head runs.

    config.yaml            fully resolved config (enough to rerun)
    checkpoint.pt          best model (by validation QWK); last.pt for resume (CNN runs)
    history.csv            one row per epoch
    predictions_<split>.csv  image_id, patient_id, klg, pred, p0..p4
    metrics_<split>.json   klgrade.evaluate.metrics.compute_metrics output
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from klgrade import io
from klgrade.errors import RunError  # noqa: F401 - re-exported
from klgrade.evaluate.metrics import N_GRADES, compute_metrics

PROB_COLUMNS = [f"p{g}" for g in range(N_GRADES)]
PRED_COLUMNS = ["image_id", "patient_id", "klg", "pred"] + PROB_COLUMNS


def predictions_frame(meta: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Build a predictions table from manifest rows (image_id, patient_id, klg) and n x 5 probs."""
    probs = np.asarray(probs, dtype=float)
    if probs.shape != (len(meta), N_GRADES):
        raise ValueError(f"probs shape {probs.shape} does not match {len(meta)} rows x {N_GRADES} grades")
    out = pd.DataFrame({
        "image_id": meta["image_id"].astype(str).to_numpy(),
        "patient_id": meta["patient_id"].astype(str).to_numpy(),
        "klg": meta["klg"].astype(int).to_numpy(),
        "pred": probs.argmax(axis=1),
    })
    for g, col in enumerate(PROB_COLUMNS):
        out[col] = probs[:, g]
    return out


def write_predictions(run_dir: str | Path, split: str, meta: pd.DataFrame, probs: np.ndarray,
                      extra_metrics: dict | None = None) -> dict:
    """Write predictions_<split>.csv and metrics_<split>.json atomically; return the metrics."""
    run_dir = Path(run_dir)
    preds = predictions_frame(meta, probs)
    io.write_csv(run_dir / f"predictions_{split}.csv", preds, float_format="%.6f")
    metrics = compute_metrics(preds["klg"], preds["pred"], preds[PROB_COLUMNS].to_numpy())
    if extra_metrics:
        metrics.update(extra_metrics)
    io.write_json(run_dir / f"metrics_{split}.json", metrics)
    return metrics


def read_predictions(run_dir: str | Path, split: str) -> pd.DataFrame:
    path = Path(run_dir) / f"predictions_{split}.csv"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("predictions_") for p in Path(run_dir).glob("predictions_*.csv"))
        raise RunError(f"{run_dir}: no predictions for split '{split}' (has: {have or 'none'}); "
                       f"run `klgrade evaluate --run {run_dir} --split {split}`")
    df = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    missing = [c for c in PRED_COLUMNS if c not in df.columns]
    if missing:
        raise RunError(f"{path}: missing column(s) {missing}")
    return df


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a klgrade run (no config.yaml)")
    try:
        cfg = io.read_yaml(path)
    except (yaml.YAMLError, OSError, UnicodeDecodeError, ValueError) as e:
        # safe_load refuses unsafe tags (!!python/object) as a ConstructorError: never executed
        reason = " ".join(str(e).split())  # YAML errors span lines: keep the message to one
        raise RunError(f"{path}: not valid YAML ({type(e).__name__}: {reason[:300]})") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: expected a mapping of settings, found a {type(cfg).__name__}")
    return cfg


def run_name(run_dir: str | Path) -> str:
    """Display name of a run: config 'name' if set, else the folder name."""
    try:
        return read_config(run_dir).get("name") or Path(run_dir).name
    except RunError:
        return Path(run_dir).name


def run_dataset(run_dir: str | Path, data: str | Path | None = None) -> str:
    """The dataset to evaluate a run on: ``data`` if given, else the one it was trained on."""
    chosen = data or read_config(run_dir).get("data")
    if not chosen:
        raise RunError(f"{run_dir}: its config names no dataset; pass --data DIR")
    return str(chosen)


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
