"""Check that the model's views are byte-identical before and after a change to the view code.

The model was trained on these views and the decode cache is keyed on them, so a speed-up of
klgrade.view (or of what it calls) must not move a single byte. Run once on the old code to record
a digest of every view and its ViewInfo, then on the new code to compare::

    .venv/bin/python benchmarks/check_view_identity.py --record /tmp/views_ref.json
    # ... change the code ...
    .venv/bin/python benchmarks/check_view_identity.py --check /tmp/views_ref.json

Inputs (made deterministically under --inputs): synthetic bilateral DICOM films at several shapes,
spacings (incl. non-square pixels), bit depths and MONOCHROME1; unilateral DICOMs (left, right,
no laterality); synthetic PNG crops at several framings, aspects and sizes; degenerate images
(flat, noise) for the fallback path; and real kneeKL224 crops (--real N of them, if present).
Every file goes through klgrade.view.entrance.film_knees (each knee of a bilateral film) at
several view sizes; the arrays also through canonical_view with every intensity option.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = (224, 160, 64)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224" / "train"  # ../shared beside the repo


def _films(out: Path) -> list[Path]:
    from klgrade.synthetic import bilateral_dataset, render_bilateral, save_dataset, to_stored

    specs = [  # (shape, spacing, photometric, bits, seed)
        ((2000, 2560), 0.14, "MONOCHROME2", 12, 0), ((2000, 2560), 0.14, "MONOCHROME1", 12, 1),
        ((1400, 1800), 0.2, "MONOCHROME2", 16, 2), ((720, 1040), 0.25, "MONOCHROME2", 12, 3),
        ((1000, 1300), (0.28, 0.26), "MONOCHROME2", 12, 4), ((2400, 3000), 0.1, "MONOCHROME1", 14, 5),
        ((600, 900), 0.35, "MONOCHROME2", 10, 6), ((1800, 2300), 0.15, "MONOCHROME2", 12, 7),
    ]
    paths = []
    for shape, sp, phot, bits, seed in specs:
        p = out / f"film_{seed}.dcm"
        if not p.exists():
            rng = np.random.default_rng(seed)
            mean_sp = sp if np.isscalar(sp) else float(np.mean(sp))
            img, _ = render_bilateral(seed % 5, (seed + 2) % 5, rng, spacing_mm=mean_sp, shape=shape)
            save_dataset(bilateral_dataset(to_stored(img, phot, bits), sp, phot, bits_stored=bits,
                                           uid_seed=seed), p)
        paths.append(p)
    return paths


def _unilateral(out: Path) -> list[Path]:
    from pydicom import dcmread

    from klgrade.synthetic import bilateral_dataset, render_knee, save_dataset, to_stored

    paths = []
    for seed, lat in ((10, "L"), (11, "R"), (12, "")):
        p = out / f"uni_{seed}.dcm"
        if not p.exists():
            img, _ = render_knee(seed % 5, np.random.default_rng(seed), size_px=900, spacing_mm=0.18)
            img = img[:, ::-1] if lat == "L" else img
            save_dataset(bilateral_dataset(to_stored(np.ascontiguousarray(img)), 0.18, uid_seed=seed), p)
            if lat:
                ds = dcmread(p)
                ds.ImageLaterality = lat
                ds.save_as(p)
        paths.append(p)
    return paths


def _crops(out: Path) -> list[Path]:
    from klgrade.synthetic import render_knee

    paths = []
    for i in range(40):
        p = out / f"crop_{i}.png"
        if not p.exists():
            rng = np.random.default_rng(100 + i)
            size = (64, 128, 224, 300, 512)[i % 5]
            img, _ = render_knee(i % 5, rng, size_px=size, fov_mm=(100.0, 140.0, 200.0, 260.0)[i % 4],
                                 jitter_mm=(3.0, 15.0)[i % 2])
            if i % 3 == 1:  # wide and tall framings
                img = img[size // 5: size - size // 5]
            elif i % 3 == 2:
                img = img[:, size // 6: size - size // 6]
            Image.fromarray((img * (255 if i % 2 else 65535)).astype(np.uint8 if i % 2 else np.uint16)).save(p)
        paths.append(p)
    for name, arr in (("flat", np.full((200, 200), 128, np.uint8)),
                      ("noise", np.random.default_rng(0).integers(0, 255, (256, 320), dtype=np.uint8))):
        p = out / f"{name}.png"
        if not p.exists():
            Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _real(n: int, root: Path = REAL) -> list[Path]:
    files = sorted(root.glob("*/*.png")) if root.is_dir() else []
    step = max(1, len(files) // n) if n else 0
    return files[::step][:n] if n else []


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()[:20]


def digests(inputs: Path, n_real: int, real_dir: Path = REAL) -> dict:
    from klgrade.view.canonical import canonical_view
    from klgrade.view.entrance import ViewError, film_knees, read_film

    inputs.mkdir(parents=True, exist_ok=True)
    files = _films(inputs) + _unilateral(inputs) + _crops(inputs) + _real(n_real, real_dir)
    out = {}
    for i, f in enumerate(files):
        key = f.name if f.parent == inputs else f"{f.parent.name}/{f.name}"
        for size in SIZES if i < 60 or i % 4 == 0 else SIZES[:1]:
            try:
                layout, knees = film_knees(f, size)
            except ViewError as e:
                out[f"{key}@{size}"] = f"error: {e}"
                continue
            for k in knees:
                out[f"{key}@{size}:{k.side}"] = [layout, None if k.view is None else _digest(k.view),
                                                 k.info.as_dict() if k.info else None, k.location, k.note, k.error]
        if i < 60:  # every intensity option on the decoded array
            img, sp = read_film(f)[:2]
            for intensity, clahe in (("window", False), ("none", False), ("match", True)):
                v, info = canonical_view(img, 128, spacing_mm=sp, intensity=intensity, clahe=clahe)
                out[f"{key}:{intensity}{'+clahe' if clahe else ''}"] = [_digest(v), info.as_dict()]
    return out


def _drop_new_info_fields(now: dict, ref: dict) -> set[str]:
    """Remove from ``now``'s ViewInfo dicts the keys the record's lack (a field added to ViewInfo
    does not change a view); returns their names."""
    added = set()
    for k, entry in now.items():
        was = ref.get(k)
        if not (isinstance(entry, list) and isinstance(was, list)):
            continue
        for i, (a, b) in enumerate(zip(entry, was)):
            if isinstance(a, dict) and isinstance(b, dict) and "centre" in a:
                extra = set(a) - set(b)
                added |= extra
                entry[i] = {f: v for f, v in a.items() if f not in extra}
    return added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", help="write the digests here")
    g.add_argument("--check", help="compare with digests recorded here")
    ap.add_argument("--inputs", default="/tmp/klgrade_view_identity", help="where the synthetic inputs are kept")
    ap.add_argument("--real", type=int, default=300, help="how many kneeKL224 train crops")
    ap.add_argument("--real-dir", default=str(REAL), help="kneeKL224 train folder (<grade>/<file>.png)")
    args = ap.parse_args()
    d = json.loads(json.dumps(digests(Path(args.inputs), args.real, Path(args.real_dir))))  # tuples -> lists, as recorded
    n_views = sum(1 for v in d.values() if isinstance(v, list) and v and v[0] != "error")
    if args.record:
        Path(args.record).write_text(json.dumps(d, indent=1) + "\n")
        print(f"recorded {len(d)} entries ({n_views} views)")
        return
    ref = json.loads(Path(args.check).read_text())
    added = _drop_new_info_fields(d, ref)
    diff = sorted(k for k in set(ref) | set(d) if ref.get(k) != d.get(k))
    print(f"{len(d)} entries ({n_views} views) vs {len(ref)} recorded: {len(diff)} differ"
          + (f" (ViewInfo fields added since the record, not compared: {', '.join(sorted(added))})" if added else ""))
    for k in diff[:20]:
        print(" ", k, "\n    was", ref.get(k), "\n    now", d.get(k))
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
