"""Decode-once image cache: every image of a manifest decoded and resized once into a uint8
memory-mapped array, so training and embedding read pixels, not files (40k images at 224 px are
2 GB on disk and need far less RAM, since pages come and go)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from klgrade import io
from klgrade.ingest.manifest import ManifestError
from klgrade.view.entrance import load_view

CACHE_VERSION = 9  # 2: canonical view replaced the centre crop; 3: faint joint lines accepted;
# 4: joint-line dominance measured against rows beyond the line's own filter reach;
# 5: intensity statistics from the joint-centred STATS_BOX instead of the whole frame;
# 6: one entrance (view.entrance): DICOM films reduced first, the manifest's knee of a bilateral
#    film, a single left DICOM knee mirrored by its laterality, as predict does;
# 7: one locator (ingest.roi) for ingest and view; with a pixel spacing the closer look is tighter
#    and centred on both bone bands (DICOM films only: crops without spacing are byte-identical,
#    benchmarks/check_view_identity.py on 600 kneeKL224 crops)
# 8: PNG/JPEG/TIFF files stored bone-dark are read inverted (klgrade.ingest.polarity): 84 kneeKL224
#    crops; every other view is unchanged
# 9: a bilateral film's split work image by OpenCV's area mean (a partial last block is cut, not
#    averaged) and its air fill from the same percentiles; a film's locator works in float32.
#    Crops without a spacing and the synthetic films of check_view_identity.py are byte-identical
#    (1,281 views, 600 real kneeKL224 crops); a wide no-spacing image's split may move a few px


def _cache_key(paths: Sequence[Path], size: int, sides: Sequence[str]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}".encode())
    for p, side in zip(paths, sides):
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{side}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("KLGRADE_CACHE", Path.home() / ".cache" / "klgrade"))


def cached_views(paths: Sequence[str | Path], size: int, cache_dir: str | Path | None = None,
                 workers: int = 0, progress: bool = True, sides: Sequence[str] | None = None) -> np.ndarray:
    """Return an (N, size, size) uint8 array (memory-mapped) of the images' views
    (klgrade.view.entrance.load_view; ``sides``: the knee of each bilateral film, e.g.
    klgrade.ingest.manifest.image_sides).

    The cache file is keyed by the paths, their sizes, mtimes and sides and ``size``: a changed
    image or a new size builds a new cache. It is written to a temp file and renamed, so an
    interrupted build leaves nothing half-made.
    """
    paths = [Path(p).resolve() for p in paths]
    sides = [str(s or "") for s in sides] if sides is not None else [""] * len(paths)
    if len(sides) != len(paths):
        raise ValueError(f"{len(sides)} sides for {len(paths)} paths")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"views_{size}px_{_cache_key(paths, size, sides)}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    io.sweep_stale(cache_dir, "views")  # builds killed with SIGKILL leave GBs behind
    tmp = cache_dir / f"{io.scratch_prefix('views')}{target.stem}.tmp"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
    failures: dict[int, str] = {}
    try:
        def work(i: int) -> None:
            try:
                arr[i] = load_view(paths[i], size, sides[i])
            except Exception as e:  # noqa: BLE001 - every unreadable file is listed, not just the first
                failures[i] = str(e).removeprefix(f"{paths[i]}: ") or type(e).__name__

        n_threads = workers if workers > 0 else min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(n_threads) as pool:
            list(tqdm(pool.map(work, range(len(paths))), total=len(paths), disable=not progress,
                      desc=f"caching {size}px views", unit="img"))
        if failures:
            raise ManifestError(_unreadable(paths, failures))
        arr.flush()
        os.replace(tmp, target)  # the open map stays valid on POSIX; callers get a fresh read-only one
    finally:
        if tmp.exists():
            tmp.unlink()
    return np.load(target, mmap_mode="r")


def _unreadable(paths: Sequence[Path], failures: dict[int, str]) -> str:
    """One line: how many images cannot be read, the first few with their reasons, and the fix.
    A dataset with an unreadable image is refused as a whole (metrics on a silently smaller set
    would not compare with other runs'), as read_manifest refuses a missing file."""
    first = "; ".join(f"{paths[i]}: {failures[i]}" for i in sorted(failures)[:3])
    more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
    return (f"{len(failures)} of {len(paths)} image(s) cannot be read: {first}{more}; remove them from "
            "the manifest (klgrade prepare lists such files in rejects.csv)")
