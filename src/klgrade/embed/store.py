"""The embedding store: frozen-backbone vectors of a dataset's images, reusable and incremental.

A store is a folder::

    vectors.npy   float32 (rows, dim), row i belongs to index.csv row i
    index.csv     image_id, path (as in the manifest), size, mtime_ns (of the image file when embedded)
    meta.json     backbone, features, dim, weights (requested), weights_source, weights_fingerprint
                  (sha1 of the image tower's tensors), preprocessing, dataset fingerprint, rows

Running ``embed`` again reuses every row whose image_id, path, size and mtime still match (no
forward pass); new or changed images are embedded and merged in. A store made with another backbone,
other weights or other preprocessing is refused. Work is flushed to disk every ``chunk_size`` images,
so an interrupted run resumes where it stopped. meta.json is written last and records the row count,
so a store caught half-written is detected, never silently used.

Under ``torchrun --nproc_per_node=N`` the images to embed are sharded across the processes (gloo on
CPU, NCCL on GPU); rank 0 gathers the vectors and is the only writer.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade import io

log = logging.getLogger(__name__)

STORE_FORMAT = "klgrade-embeddings"
STORE_VERSION = 1
VECTORS, INDEX, META = "vectors.npy", "index.csv", "meta.json"
INDEX_COLUMNS = ["image_id", "path", "size", "mtime_ns"]
# Fields that must agree for two embedding runs to share a store.
MATCH_FIELDS = ("backbone", "features", "dim", "weights_fingerprint", "preprocessing")


class StoreError(ValueError):
    """An embedding store that cannot be used as asked; the message names the store and the reason."""


def store_key(embedder) -> dict:
    """What identifies the vectors an embedder makes (everything but the images)."""
    return {
        "backbone": embedder.backbone,
        "features": embedder.features,
        "dim": int(embedder.dim),
        "weights_fingerprint": embedder.fingerprint,
        "preprocessing": embedder.preprocessing(),
    }


def file_keys(paths) -> tuple[np.ndarray, np.ndarray]:
    sizes, mtimes = [], []
    for p in paths:
        st = os.stat(p)
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return np.asarray(sizes, dtype=np.int64), np.asarray(mtimes, dtype=np.int64)


def _dataset_fingerprint(index: pd.DataFrame) -> str:
    h = hashlib.sha1()
    rows = index.sort_values("image_id")
    for iid, path, size in zip(rows["image_id"], rows["path"], rows["size"]):
        h.update(f"{iid}|{path}|{size}\n".encode())
    return h.hexdigest()


@dataclass
class EmbeddingStore:
    root: Path
    meta: dict
    index: pd.DataFrame
    vectors: np.ndarray

    # ------------------------------------------------------------------ open / create / save
    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / META).is_file()

    @classmethod
    def open(cls, root: str | Path) -> EmbeddingStore:
        root = Path(root)
        if not cls.exists(root):
            if root.is_dir() and any(root.iterdir()):
                raise StoreError(f"{root}: not an embedding store (no {META}); pick an empty or new --out")
            raise StoreError(f"{root}: no embedding store here (run `klgrade embed ... --out {root}` first)")
        try:
            meta = io.read_json(root / META)
        except ValueError as e:
            raise StoreError(f"{root / META}: not valid JSON ({e})") from e
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{root / META}: not a klgrade embedding store (format {meta.get('format')!r})")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"{root}: store version {meta.get('version')} is not supported (expected "
                             f"{STORE_VERSION}); re-run `klgrade embed --rebuild`")
        try:
            vectors = np.load(root / VECTORS)
            index = pd.read_csv(root / INDEX, dtype={"image_id": str, "path": str}, keep_default_na=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"{root}: {VECTORS}/{INDEX} unreadable ({e}); re-run `klgrade embed --rebuild`") from e
        rows = meta.get("rows")
        if not (vectors.ndim == 2 and len(vectors) == len(index) == rows and vectors.shape[1] == meta.get("dim")):
            raise StoreError(f"{root}: inconsistent store ({VECTORS} {vectors.shape}, {INDEX} {len(index)} rows, "
                             f"{META} says {rows} x {meta.get('dim')}): it was interrupted while being written; "
                             "re-run `klgrade embed ... --rebuild`")
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise StoreError(f"{root / INDEX}: missing column(s) {missing}")
        return cls(root=root, meta=meta, index=index[INDEX_COLUMNS].copy(), vectors=vectors.astype(np.float32))

    @classmethod
    def create(cls, root: str | Path, key: dict, extra: dict | None = None) -> EmbeddingStore:
        meta = {"format": STORE_FORMAT, "version": STORE_VERSION, **key, **(extra or {})}
        index = pd.DataFrame({c: pd.Series(dtype=object if c in ("image_id", "path") else np.int64)
                              for c in INDEX_COLUMNS})
        return cls(root=Path(root), meta=meta, index=index, vectors=np.zeros((0, key["dim"]), dtype=np.float32))

    def save(self) -> None:
        """Write vectors, index, then meta (the commit point: it records the row count)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.root / VECTORS) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self.vectors, dtype=np.float32))
        io.write_csv(self.root / INDEX, self.index[INDEX_COLUMNS])
        self.meta.update({
            "rows": len(self.index),
            "dataset_fingerprint": _dataset_fingerprint(self.index),
            "updated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        })
        io.write_json(self.root / META, self.meta)

    # ------------------------------------------------------------------ matching
    def check_matches(self, key: dict) -> None:
        """Refuse a store made with another backbone, other weights or other preprocessing."""
        diffs = []
        for f in MATCH_FIELDS:
            have, want = self.meta.get(f), key.get(f)
            if have == want:
                continue
            if isinstance(have, dict) and isinstance(want, dict):
                sub = [k for k in sorted(set(have) | set(want)) if _recipe(have.get(k)) != _recipe(want.get(k))]
                if not sub:
                    continue
                diffs += [f"{f}.{k}: store {have.get(k)!r} vs now {want.get(k)!r}" for k in sub]
            elif f == "weights_fingerprint":
                diffs.append(f"weights: store {self.meta.get('weights_source')!r} (sha1 {str(have)[:12]}) vs now "
                             f"{key.get('weights_source', '?')!r} (sha1 {str(want)[:12]})")
            else:
                diffs.append(f"{f}: store {have!r} vs now {want!r}")
        if diffs:
            raise StoreError(f"{self.root}: this embedding store was made differently and cannot be reused ("
                             + "; ".join(diffs) + "); use another --out, or --rebuild to overwrite it")

    def positions(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.index["image_id"])}

    def vectors_for(self, df: pd.DataFrame, data: str | Path | None = None) -> np.ndarray:
        """Vectors aligned to the rows of manifest frame ``df``; StoreError if any is absent or stale."""
        from klgrade.ingest.manifest import image_paths

        data = data or df.attrs.get("root", "the manifest")
        pos = self.positions()
        ids = df["image_id"].astype(str).tolist()
        absent = [i for i in ids if i not in pos]
        hint = (f"run `klgrade embed --data {data} --backbone {self.meta.get('backbone')} "
                f"--weights {self.meta.get('weights', 'auto')} --out {self.root}`")
        if absent:
            raise StoreError(f"{self.root}: no vectors for {len(absent)} of {len(ids)} image(s) of {data} "
                             f"(e.g. {absent[:5]}); {hint} to add them")
        rows = np.fromiter((pos[i] for i in ids), dtype=np.int64, count=len(ids))
        sub = self.index.iloc[rows]
        sizes, _ = file_keys(image_paths(df))
        stale = np.flatnonzero((sub["path"].to_numpy() != df["path"].astype(str).to_numpy())
                               | (sub["size"].to_numpy() != sizes))
        if len(stale):
            i = stale[0]
            raise StoreError(
                f"{self.root}: vectors of {len(stale)} image(s) were made from other files than {data} lists "
                f"(e.g. image_id {ids[i]}: store has {sub['path'].iat[i]} ({sub['size'].iat[i]} bytes), manifest "
                f"has {df['path'].iat[i]} ({sizes[i]} bytes)); {hint} to refresh them")
        return self.vectors[rows]

    def merge(self, image_ids, paths, sizes, mtimes, vecs: np.ndarray) -> None:
        """Insert or replace rows (a replaced row is an image whose file changed)."""
        pos = self.positions()
        new = []
        for j, iid in enumerate(image_ids):
            r = pos.get(iid)
            if r is None:
                new.append(j)
                continue
            self.vectors[r] = vecs[j]
            self.index.iloc[r, 1:] = [paths[j], int(sizes[j]), int(mtimes[j])]
        if new:
            add = pd.DataFrame({"image_id": [image_ids[j] for j in new], "path": [paths[j] for j in new],
                                "size": np.asarray(sizes)[new].astype(np.int64),
                                "mtime_ns": np.asarray(mtimes)[new].astype(np.int64)})
            self.index = pd.concat([self.index, add], ignore_index=True) if len(self.index) else add
            self.vectors = np.concatenate([self.vectors, vecs[new].astype(np.float32)])


def open_store(root: str | Path) -> EmbeddingStore:
    return EmbeddingStore.open(root)


# ---------------------------------------------------------------------------- distributed helpers
def _dist_init(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether we initialised the process group) under torchrun; (0, 1, False) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, rank: int, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------------------------- embedding
def embed_dataset(
    data: str | Path,
    backbone: str,
    out: str | Path,
    weights: str = "auto",
    features: str = "proj",
    split: str = "all",
    batch_size: int = 32,
    device: str | None = None,
    seed: int = 0,
    embedder=None,
    rebuild: bool = False,
    chunk_size: int = 2048,
    workers: int = 0,
    progress: bool = True,
) -> EmbeddingStore | None:
    """Embed the images of dataset ``data`` (``split`` or all) into store ``out``; return the store.

    Only images absent from the store (or whose file changed) go through the backbone. ``embedder``
    may be passed pre-built (then backbone/weights/features/device/seed are taken from it). Under
    torchrun every rank must call this; rank 0 returns the store, other ranks return None.
    """
    from klgrade.embed.embedders import build_embedder, default_device
    from klgrade.ingest.manifest import read_manifest, select_split

    out = Path(out)
    df = select_split(read_manifest(data), split)
    device = (embedder.device if embedder is not None else None) or device or default_device()
    if str(device) == "cuda" and os.environ.get("LOCAL_RANK"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank, world, own_group = _dist_init(device)
    try:
        if embedder is None:
            embedder = build_embedder(backbone, weights=weights, features=features, device=device, seed=seed)
        store, todo, files = _plan_store(out, df, embedder, rebuild, world) if rank == 0 else (None, None, None)
        todo = _broadcast(todo, world)
        if not todo:
            return store
        _embed_into(store, df, data, embedder, todo, files, rank, world, batch_size, chunk_size, workers, progress)
        return store if rank == 0 else None
    finally:
        if own_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _plan_store(out: Path, df: pd.DataFrame, embedder, rebuild: bool, world: int):
    """Open (and check) or create the store; (store, rows of ``df`` to embed, (sizes, mtimes))."""
    from klgrade.ingest.manifest import image_paths

    sizes, mtimes = file_keys(image_paths(df))
    if EmbeddingStore.exists(out) and not rebuild:
        store = EmbeddingStore.open(out)
        store.check_matches({**store_key(embedder), "weights_source": embedder.weights_source})
    else:
        if out.exists() and not rebuild and out.is_dir() and any(out.iterdir()):
            raise StoreError(f"{out}: folder is not empty and holds no embedding store; pick another --out")
        store = EmbeddingStore.create(out, store_key(embedder), extra={
            "weights": embedder.weights, "weights_source": embedder.weights_source, "seed": embedder.seed,
            "library_versions": _versions()})
    known = dict(zip(store.index["image_id"], zip(store.index["path"], store.index["size"],
                                                  store.index["mtime_ns"])))
    now = zip(df["image_id"].astype(str), df["path"].astype(str), sizes.tolist(), mtimes.tolist())
    todo = [i for i, (iid, *fkey) in enumerate(now) if known.get(iid) != tuple(fkey)]
    log.info("%s: %d image(s) selected, %d already embedded, %d to embed (%d process(es))",
             out, len(df), len(df) - len(todo), len(todo), world)
    if not todo and not EmbeddingStore.exists(out):
        store.save()  # an empty selection still leaves a valid store behind
    return store, todo, (sizes, mtimes)


def _embed_into(store, df: pd.DataFrame, data, embedder, todo: list[int], files, rank: int, world: int,
                batch_size: int, chunk_size: int, workers: int, progress: bool) -> None:
    """Embed rows ``todo`` (this rank's share) chunk by chunk; rank 0 merges every rank's vectors
    into the store and flushes it after each chunk, so an interrupted run keeps what is done."""
    from tqdm import tqdm

    from klgrade.ingest.manifest import image_paths, image_sides
    from klgrade.view.cache import cached_views

    paths, sides = image_paths(df), image_sides(df)
    shard = todo[rank::world]
    n_chunks = -(-len(todo[0::world]) // chunk_size)  # rank 0 has the largest shard; all loop alike
    views = cached_views([paths[i] for i in shard], embedder.input_size, workers=workers,
                         progress=progress and rank == 0, sides=[sides[i] for i in shard]) if shard else None
    bar = tqdm(total=len(todo), disable=not progress or rank != 0, unit="img",
               desc=f"embedding with {embedder.backbone}")
    for c in range(n_chunks):
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, len(shard))
        local = (embedder.embed_views(views[lo:hi], batch_size=batch_size, bar=bar, world=world)
                 if hi > lo else np.zeros((0, embedder.dim), np.float32))
        parts = _gather((shard[lo:hi], local), rank, world)
        if rank == 0:
            sizes, mtimes = files
            idx = [i for p in parts for i in p[0]]
            vecs = np.concatenate([p[1] for p in parts]) if idx else np.zeros((0, embedder.dim), np.float32)
            store.merge([str(df["image_id"].iat[i]) for i in idx], [str(df["path"].iat[i]) for i in idx],
                        sizes[idx], mtimes[idx], vecs)
            store.meta["dataset_root"] = str(df.attrs.get("root", data))
            store.save()
    bar.close()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "timm", "open_clip_torch", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _recipe(value):
    """A preprocessing recipe without a module path: stores made before VIEW_RECIPE dropped it say
    'canonical_view (klgrade.data.canonical), view version 5' or '... (klgrade.view.canonical) ...';
    a file move is not a view change, the view version decides."""
    return re.sub(r"\s*\(klgrade(\.\w+)+\)", "", value) if isinstance(value, str) else value
