"""The images a pretraining run sees (labels ignored) and the fixed sets it is monitored on.

Held-out discipline: only rows of ``cfg.splits`` (default train) are pretrained on, so the images
used for reporting are never seen, not even unlabelled. Each dataset is recorded in config.yaml by
fingerprint: the manifest file's sha256 and a sha1 over the (image_id, path, size) rows used.
Every image becomes a model input through the decode cache (klgrade.view.cache.cached_views), i.e.
the one canonical view function.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade.pretrain.config import PretrainConfig
from klgrade.pretrain.monitor import MonitorSet


class NoImagesError(ValueError):
    """Nothing to pretrain on (empty selection); the message names the datasets and splits."""


@dataclass
class PretrainData:
    df: pd.DataFrame  # rows pretrained on, all datasets (column 'dataset' = index into cfg.data)
    views: np.ndarray  # (N,S,S) uint8, row-aligned with df
    fingerprints: list[dict]
    monitor: MonitorSet | None  # None on ranks other than 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rows_sha1(df: pd.DataFrame, paths: list[Path]) -> str:
    h = hashlib.sha1()
    for iid, p in sorted(zip(df["image_id"].astype(str), map(str, paths))):
        h.update(f"{iid}|{p}|{os.stat(p).st_size}\n".encode())
    return h.hexdigest()


def select(df: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    return df if "all" in splits else df[df["split"].isin(splits)]


def read_datasets(cfg: PretrainConfig) -> tuple[pd.DataFrame, list[dict], list[pd.DataFrame]]:
    """(rows to pretrain on, fingerprints, each dataset's full manifest)."""
    from klgrade.ingest.manifest import image_paths, manifest_path, read_manifest

    parts, prints, full = [], [], []
    for i, d in enumerate(cfg.data):
        df = read_manifest(d)
        used = select(df, cfg.splits).copy()
        used.attrs["root"] = df.attrs["root"]
        paths = image_paths(used)
        used["abs_path"] = [str(p) for p in paths]
        used["dataset"] = i
        prints.append({"data": str(d), "manifest_sha256": _sha256(manifest_path(d)), "splits": list(cfg.splits),
                       "n_images": int(len(used)), "images_sha1": _rows_sha1(used, paths)})
        parts.append(used)
        full.append(df)
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(rows) == 0:
        raise NoImagesError(f"no images to pretrain on: splits {cfg.splits} select nothing in "
                            f"{', '.join(map(str, cfg.data)) or '(no --data given)'}")
    return rows, prints, full


def monitor_set(cfg: PretrainConfig, rows: pd.DataFrame, views: np.ndarray, full: list[pd.DataFrame],
                progress: bool) -> MonitorSet:
    """Fixed, seeded subsets: RankMe on pretraining images; kNN (labelled train -> val) on the
    datasets that have a val split which is not itself pretrained on."""
    from klgrade.ingest.manifest import image_paths
    from klgrade.view.cache import cached_views

    rng = np.random.default_rng(cfg.seed)
    m = cfg.monitor_images
    rank_idx = np.sort(rng.permutation(len(rows))[:m])
    mon = MonitorSet(rank_views=np.asarray(views[rank_idx]), k=cfg.knn_k)
    watched = [i for i, df in enumerate(full) if (df["split"] == "val").any()
               and "val" not in cfg.splits and "all" not in cfg.splits]
    if not watched:
        return mon
    ref_pos = np.flatnonzero(rows["dataset"].isin(watched).to_numpy() & (rows["split"] == "train").to_numpy())
    if len(ref_pos) == 0:
        return mon
    ref_pos = np.sort(rng.permutation(ref_pos)[:4 * m])
    val = pd.concat([full[i][full[i]["split"] == "val"] for i in watched])
    val_paths = [p for i in watched for p in image_paths(full[i][full[i]["split"] == "val"])]
    pick = np.sort(rng.permutation(len(val))[:2 * m])
    val_views = cached_views([val_paths[j] for j in pick], cfg.img_size, cfg.cache_dir, progress=progress)
    mon.ref_views, mon.ref_labels = np.asarray(views[ref_pos]), rows["klg"].to_numpy()[ref_pos]
    mon.val_views, mon.val_labels = np.asarray(val_views), val["klg"].to_numpy()[pick]
    return mon


def load_pretrain_data(cfg: PretrainConfig, dist) -> PretrainData:
    """Rank 0 decodes into the cache; the other processes then open the finished cache."""
    from klgrade.view.cache import cached_views

    rows, prints, full = read_datasets(cfg)
    paths = rows["abs_path"].tolist()

    mon = None  # rank 0 alone monitors
    if dist.is_main:
        views = cached_views(paths, cfg.img_size, cfg.cache_dir, progress=True)
        mon = monitor_set(cfg, rows, views, full, progress=True)
    dist.barrier()
    if not dist.is_main:
        views = cached_views(paths, cfg.img_size, cfg.cache_dir, progress=False)
    return PretrainData(df=rows, views=views, fingerprints=prints, monitor=mon)
