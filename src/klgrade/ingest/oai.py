"""Osteoarthritis Initiative (OAI) ingest: KL label tables, the image tree, and ``prepare oai``.

Label-table reading lives in ``klgrade.ingest.oai_labels`` and the tree walk in ``klgrade.ingest.oai_series``;
both are re-exported here, where callers look for them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade.grades import GRADES, N_GRADES

# Re-exported here, where callers look for them: label-table reading (oai_labels) and the tree walk
# (oai_series).
from klgrade.ingest.oai_labels import (  # noqa: F401
    FEATURES,
    LABEL_COLUMNS,
    MONTHS_VISIT,
    PREFERRED_READPRJ,
    STUDY_VISITS,
    VISIT_MONTHS,
    LabelError,
    Labels,
    missing_code,
    parse_code,
    parse_side,
    read_label_table,
    read_labels,
)
from klgrade.ingest.oai_series import (  # noqa: F401
    KNEE_SERIES,
    parse_oai_path,
    series_from_contents,
    series_from_headers,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- per-image work

@dataclass(frozen=True)
class CropParams:
    size: int = 400
    mm_per_px: float = 0.35
    min_confidence: float = 0.5

    @property
    def fov_mm(self) -> float:
        return self.size * self.mm_per_px

    def tag(self) -> str:
        # "loc2": the one locator and the crop's spacing chunk (issue 15); older crops are redone
        return f"{self.size}px@{self.mm_per_px:g}mm/conf{self.min_confidence:g}/loc2"


def image_id(patient_id: str, visit: int, side: str) -> str:
    return f"{patient_id}_{int(visit):02d}m_{side}"


def crop_relpath(patient_id: str, visit: int, side: str) -> str:
    return f"images/{int(visit):02d}m/{image_id(patient_id, visit, side)}.png"


def write_png16(path: Path, arr: np.ndarray, spacing_mm: float | None = None) -> None:
    """Atomic 16-bit grayscale PNG. With ``spacing_mm`` (a crop centred on its joint) the spacing
    and the centre go into text chunks (klgrade.ingest.images.SPACING_KEY, JOINT_KEY): the view
    frames the crop on them, as it frames the film. zlib level 1: the PNG write is the costliest
    step of a film, and noisy 16-bit radiographs shrink little more at higher levels (~3% at 6)."""
    from PIL import Image, PngImagePlugin

    from klgrade import io
    from klgrade.ingest.images import JOINT_KEY, SPACING_KEY

    info = PngImagePlugin.PngInfo()
    if spacing_mm is not None:
        info.add_text(SPACING_KEY, f"{spacing_mm:.6g}")
        info.add_text(JOINT_KEY, f"{(arr.shape[1] - 1) / 2:g},{(arr.shape[0] - 1) / 2:g}")
    with io.atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16)).save(tmp, format="PNG", compress_level=1,
                                                                         pnginfo=info)


def process_series(task: dict) -> dict:
    """Read one bilateral film, locate both joints, write the crops of the graded sides.

    ``task``: path, rel, patient_id, visit, sides (to crop), out, params (CropParams as dict).
    Returns a record {rel, params, sides: {side: {'crop': {...}} | {'reject': reason}}}; never
    raises for a bad image (the reason goes into the record), so one file cannot stop a batch.
    """
    from klgrade.ingest.crop import crop_square, to_uint16
    from klgrade.ingest.dicom import DicomError, read_radiograph
    from klgrade.ingest.roi import locate_bilateral

    params = CropParams(**task["params"])
    rec = {"rel": task["rel"], "params": params.tag(), "sides": {}}

    def reject_all(reason: str) -> dict:
        rec["sides"] = {s: {"reject": reason} for s in task["sides"]}
        return rec

    try:
        rad = read_radiograph(task["path"])
    except DicomError as e:
        return reject_all(f"unreadable DICOM: {e.reason}")
    except (OSError, MemoryError) as e:
        return reject_all(f"unreadable file: {type(e).__name__}: {e}")
    if rad.spacing_mm is None:
        return reject_all("no pixel spacing (neither ImagerPixelSpacing nor PixelSpacing): "
                          "cannot cut a crop of fixed size in mm")
    try:
        locs = locate_bilateral(rad.pixels, rad.spacing_mm, min_confidence=params.min_confidence)
    except Exception as e:  # noqa: BLE001 - an odd film is this film's reject, never the batch's end
        return reject_all(f"knee joints not located ({type(e).__name__}: {e})")
    sy, sx = rad.spacing_mm
    for side in task["sides"]:
        loc = locs[side]
        if not loc.ok:
            rec["sides"][side] = {"reject": f"knee joint not located: {loc.reason}"}
            continue
        # Left knees are mirrored so every crop has the lateral side (fibula) on the image's left.
        crop = crop_square(rad.pixels, (loc.x, loc.y), params.fov_mm, rad.spacing_mm, params.size,
                           flip=(side == "L"))
        rel = crop_relpath(task["patient_id"], task["visit"], side)
        write_png16(Path(task["out"]) / rel, to_uint16(crop), params.mm_per_px)
        rec["sides"][side] = {"crop": {
            "path": rel, "joint_x": round(loc.x, 1), "joint_y": round(loc.y, 1),
            "confidence": round(loc.confidence, 3), "joint_width_mm": round(loc.width_px * sx, 1),
            "spacing_mm": round(float(np.mean((sy, sx))), 5), "spacing_source": rad.spacing_source,
            "photometric": rad.meta["photometric"], "modality": rad.meta["modality"],
            "transfer_syntax": rad.meta["transfer_syntax"], "source_rows": rad.meta["rows"],
            "source_cols": rad.meta["cols"]}}
    return rec


# --------------------------------------------------------------------------- the prepare pipeline

PROGRESS_NAME = "progress.jsonl"
SUMMARY_NAME = "summary.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
LABELS_DROPPED_NAME = "labels_dropped.csv"


@dataclass
class PrepareResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict
    out: Path
    processed: int = 0   # films read in this run
    resumed: int = 0     # films skipped because an earlier run finished them


def _read_progress(path: Path) -> dict[str, dict]:
    """Finished films from earlier runs; a line cut short by a kill is ignored (and redone)."""
    import json

    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[rec["rel"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _is_done(rec: dict | None, task: dict, params: CropParams, out: Path) -> bool:
    if rec is None or rec.get("params") != params.tag():
        return False
    for side in task["sides"]:
        r = rec["sides"].get(side)
        if r is None or ("crop" in r and not (out / r["crop"]["path"]).is_file()):
            return False
    return True


def _reason_kind(reason: str) -> str:
    """The category of a reject reason, for the summary: text before the first ':' or '('."""
    return re.split(r"[:(]", str(reason), maxsplit=1)[0].strip()


def _pool_context():
    """forkserver where available: workers fork from a clean server process that has the reader
    and localiser already imported (no inherited threads or locks, unlike fork; no per-worker
    import of numpy/scipy/pydicom, unlike spawn). Elsewhere spawn."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["klgrade.ingest.oai", "klgrade.ingest.dicom", "klgrade.ingest.roi", "pydicom"])
        return ctx
    return mp.get_context("spawn")


def _run_tasks(tasks: list[dict], workers: int, progress_path: Path, progress: bool) -> list[dict]:
    """Process films (in a process pool when workers > 1); each finished film is appended to the
    progress log at once, so a killed run resumes where it stopped."""
    import json

    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(tasks), desc="crop knees", unit="film", disable=not progress)
    with open(progress_path, "a", encoding="utf-8") as log_f:
        def record(rec: dict) -> None:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            results.append(rec)
            bar.update()

        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                record(process_series(t))
        else:
            with _pool_context().Pool(workers) as pool:
                for rec in pool.imap_unordered(process_series, tasks, chunksize=1):
                    record(rec)
    bar.close()
    return results


def prepare_oai(images, labels, out, contents=None, visits=STUDY_VISITS, workers: int = 1,
                size: int = 400, mm_per_px: float = 0.35, fractions=(0.7, 0.1, 0.2), seed: int = 0,
                description: str = KNEE_SERIES, min_confidence: float = 0.5, progress: bool = True,
                sheet_samples: int = 40) -> PrepareResult:
    """Ingest an OAI image tree + KL label tables into a dataset dir of unilateral knee crops.

    Writes ``images/<VV>m/<id>_<VV>m_<R|L>.png`` (16-bit), ``manifest.csv`` (patient-level split),
    ``rejects.csv``, ``labels_dropped.csv``, ``summary.json``, ``contact_sheet.png`` and the
    resume log ``progress.jsonl``. Re-running with the same crop parameters skips finished films.
    Three steps: plan (which film, which knees), work (crop the films not done yet), merge (manifest).
    """
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    out.mkdir(parents=True, exist_ok=True)
    params = CropParams(size=int(size), mm_per_px=float(mm_per_px), min_confidence=float(min_confidence))
    visits = tuple(int(v) for v in visits) if visits else None
    lab = read_labels(labels, visits)
    if contents:
        series, rejects, counts = series_from_contents(list(contents), images, description)
    else:
        series, rejects, counts = series_from_headers(images, description, progress)
    tasks = _plan_films(series, images, out, lab, visits, params, rejects, counts)
    done, pending = _crop_films(tasks, params, out, workers, progress)
    return _merge(tasks, done, rejects, lab, counts, out, images, fractions, seed, sheet_samples,
                  resumed=len(tasks) - len(pending))


def _plan_films(series: pd.DataFrame, images: Path, out: Path, lab: Labels, visits, params: CropParams,
                rejects: list, counts: dict) -> list[dict]:
    """One crop task per knee film of a study visit with a graded knee; everything else a reject
    (appended to ``rejects``): no id/visit in the path, a second series, an ungraded side."""
    graded = lab.lookup()
    dropped = {(r.patient_id, int(r.visit), r.side): r.reason for r in lab.dropped.itertuples(index=False)
               if r.side}
    counts["outside_visits"] = 0
    tasks, seen = [], {}
    for r in series.sort_values("path", kind="stable").itertuples(index=False):
        path = Path(r.path)
        rel = path.relative_to(images).as_posix() if path.is_relative_to(images) else str(path)
        if r.patient_id is None or r.visit is None or pd.isna(r.visit):
            rejects.append({"path": str(path), "reason": "cannot tell participant id and visit from the path "
                            "(expected <VV>m/<V>.C.2/<participant>/<date>/<barcode>/001)",
                            "patient_id": r.patient_id or "", "visit": r.visit, "side": ""})
            continue
        pid, visit = str(r.patient_id), int(r.visit)
        if visits is not None and visit not in visits:
            counts["outside_visits"] += 1
            continue
        if (pid, visit) in seen:
            rejects.append({"path": str(path), "reason": f"second knee series for this participant and visit "
                            f"(kept {seen[(pid, visit)]})", "patient_id": pid, "visit": visit, "side": ""})
            continue
        seen[(pid, visit)] = rel
        sides = [side for side in ("R", "L") if (pid, visit, side) in graded]
        for side in [s for s in ("R", "L") if s not in sides]:
            why = dropped.get((pid, visit, side), "no reading in the label tables")
            rejects.append({"path": str(path), "reason": why, "patient_id": pid, "visit": visit, "side": side})
        if sides:
            tasks.append({"path": str(path), "rel": rel, "patient_id": pid, "visit": visit, "sides": sides,
                          "out": str(out), "params": {"size": params.size, "mm_per_px": params.mm_per_px,
                                                      "min_confidence": params.min_confidence}})
    return tasks


def _crop_films(tasks: list[dict], params: CropParams, out: Path, workers: int, progress: bool):
    """Crop the films not finished by an earlier run (progress.jsonl): (records by film, pending)."""
    progress_path = out / PROGRESS_NAME
    done = _read_progress(progress_path)
    pending = [t for t in tasks if not _is_done(done.get(t["rel"]), t, params, out)]
    log.info("%d knee film(s): %d finished earlier, %d to process", len(tasks), len(tasks) - len(pending),
             len(pending))
    for rec in _run_tasks(pending, workers, progress_path, progress):
        done[rec["rel"]] = rec
    return done, pending


def _manifest_rows(tasks: list[dict], done: dict, graded: dict, rejects: list) -> list[dict]:
    rows = []
    for t in tasks:
        rec = done[t["rel"]]
        for side in t["sides"]:
            r = rec["sides"][side]
            if "reject" in r:
                rejects.append({"path": t["path"], "reason": r["reject"], "patient_id": t["patient_id"],
                                "visit": t["visit"], "side": side})
                continue
            key = (t["patient_id"], t["visit"], side)
            label = graded[key]
            row = {"image_id": image_id(*key), "path": r["crop"]["path"], "patient_id": t["patient_id"],
                   "visit": t["visit"], "side": side, "klg": int(label["klg"]), "split": "", "source": "oai",
                   **{k: v for k, v in r["crop"].items() if k != "path"}, "dicom": t["rel"]}
            for feat in list(FEATURES.values())[1:]:
                row[feat] = label.get(feat, np.nan)
            row["readprj"] = label.get("readprj")
            rows.append(row)
    return rows


def _merge(tasks, done, rejects, lab: Labels, counts, out: Path, images: Path, fractions, seed, sheet_samples,
           resumed: int) -> PrepareResult:
    """The crops and rejects of every film -> manifest.csv (patient-level split), rejects.csv,
    labels_dropped.csv, summary.json, contact sheet."""
    from klgrade import io
    from klgrade.ingest.manifest import write_manifest, write_rejects
    from klgrade.ingest.splits import patient_split

    manifest = pd.DataFrame(_manifest_rows(tasks, done, lab.lookup(), rejects))
    rej = pd.DataFrame(rejects, columns=["path", "reason", "patient_id", "visit", "side"])
    rej["visit"] = rej["visit"].astype("Int64")
    rej = rej.sort_values(["path", "side"], kind="stable").reset_index(drop=True)
    write_rejects(rej, out)
    io.write_csv(out / LABELS_DROPPED_NAME, lab.dropped)
    if manifest.empty:
        raise ValueError(f"{images}: no knee crop was produced ({len(rej)} reject(s), reasons in "
                         f"{out / 'rejects.csv'})")
    manifest = manifest.sort_values(["patient_id", "visit", "side"], kind="stable").reset_index(drop=True)
    manifest["split"] = patient_split(manifest, fractions, seed=seed).to_numpy()
    write_manifest(manifest, out)
    summary = summarize_prepare(manifest, rej, lab, counts, len(tasks), resumed)
    io.write_json(out / SUMMARY_NAME, summary)
    if sheet_samples:
        contact_sheet(manifest, out, out / CONTACT_SHEET_NAME, n=sheet_samples, seed=seed)
    return PrepareResult(manifest=manifest, rejects=rej, summary=summary, out=out,
                         processed=len(tasks) - resumed, resumed=resumed)


def summarize_prepare(manifest: pd.DataFrame, rejects: pd.DataFrame, labels: Labels, counts: dict,
                      films: int, resumed: int) -> dict:
    """Counts per visit, grade and reject reason (the end-of-run summary, also summary.json)."""
    per_visit = (pd.crosstab(manifest["visit"], manifest["klg"]).reindex(columns=GRADES, fill_value=0))
    return {
        "films": films,
        "films_resumed": resumed,
        "knee_images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "per_visit": {int(v): int(n) for v, n in manifest["visit"].value_counts().sort_index().items()},
        "per_grade": {int(g): int((manifest["klg"] == g).sum()) for g in GRADES},
        "per_visit_grade": {int(v): [int(x) for x in row] for v, row in per_visit.iterrows()},
        "per_split": {str(s): int(n) for s, n in manifest["split"].value_counts().sort_index().items()},
        "rejects": int(len(rejects)),
        "reject_reasons": {str(k): int(n) for k, n in
                           rejects["reason"].map(_reason_kind).value_counts().sort_index().items()},
        "label_rows_without_grade": int(len(labels.dropped)),
        "duplicate_readings_set_aside": int(labels.duplicates),
        **{k: int(v) for k, v in counts.items()},
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['knee_images']} knee crops from {summary['films']} films "
             f"({summary['films_resumed']} finished by an earlier run), {summary['patients']} patients"]
    lines.append("visit (months) x KL grade:")
    lines.append("  visit " + " ".join(f"{f'KL{g}':>6}" for g in GRADES) + f"{'total':>7}")
    for v, row in summary["per_visit_grade"].items():
        lines.append(f"  {v:>5} " + " ".join(f"{x:>6}" for x in row) + f"{sum(row):>7}")
    lines.append("  total " + " ".join(f"{summary['per_grade'][g]:>6}" for g in GRADES)
                 + f"{summary['knee_images']:>7}")
    lines.append("split: " + ", ".join(f"{k} {v}" for k, v in summary["per_split"].items()))
    if summary["rejects"]:
        lines.append(f"rejected {summary['rejects']} knee(s)/file(s):")
        lines += [f"  {n:>6}  {k}" for k, n in summary["reject_reasons"].items()]
    lines.append(f"label rows without a grade: {summary['label_rows_without_grade']}; duplicate readings set "
                 f"aside: {summary['duplicate_readings_set_aside']}; other series skipped: "
                 f"{summary.get('other_series', 0)}")
    return "\n".join(lines)


def contact_sheet(manifest: pd.DataFrame, root: Path, path: Path, n: int = 40, seed: int = 0,
                  tile: int = 160, cols: int = 8) -> Path:
    """A grid of sample crops (stratified by grade, seeded) captioned with grade, side and visit,
    so a person can check the crops at a glance."""
    from PIL import Image, ImageDraw

    from klgrade import io
    from klgrade.ingest.images import read_image

    rng = np.random.default_rng(seed)
    per = max(1, n // N_GRADES)
    picks = []
    for g in GRADES:
        idx = manifest.index[manifest["klg"] == g].to_numpy()
        if len(idx):
            picks += rng.choice(idx, size=min(per, len(idx)), replace=False).tolist()
    rest = manifest.index.difference(picks).to_numpy()
    if len(picks) < n and len(rest):
        picks += rng.choice(rest, size=min(n - len(picks), len(rest)), replace=False).tolist()
    sel = manifest.loc[sorted(picks, key=lambda i: (manifest.at[i, "klg"], i))]
    rows = int(np.ceil(len(sel) / cols))
    sheet = Image.new("L", (cols * tile, rows * (tile + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(sel.itertuples(index=False)):
        img = read_image(Path(root) / r.path)
        im = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).resize((tile, tile))
        x, y = (k % cols) * tile, (k // cols) * (tile + 14)
        sheet.paste(im, (x, y))
        draw.text((x + 3, y + tile + 1), f"KL{r.klg} {r.side} {int(r.visit)}m {r.patient_id}", fill=255)
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
