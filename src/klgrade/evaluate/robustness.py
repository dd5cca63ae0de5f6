"""Robustness to site shift: a run graded on the same images re-rendered as other sites would.

Each image of a split is re-rendered from its ORIGINAL file under every controlled shift of
klgrade.augment.site_shift (zoom +-30%, off-centre, non-square, gamma, blur, noise, 16-bit, RGB),
written as a file, read back with klgrade.ingest.images.read_image and turned into the model's
input by the same canonical view the model always uses. QWK (and accuracy, adjacent accuracy,
MAE) per shift is reported beside the clean score, all from klgrade.evaluate.metrics.

    res = evaluate_robustness("runs/resnet18", "data/kneeKL224", split="val", out="robust/")
    robustness_table(res)   # DataFrame: shift, description, n, qwk, qwk_drop, ..., view_ok
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from klgrade import io
from klgrade.errors import UserError
from klgrade.evaluate.metrics import compute_metrics

TARGET_DROP = 0.05  # issue 8: QWK may drop at most this much under any shift
TABLE_COLUMNS = ["shift", "description", "n", "qwk", "qwk_drop", "grade_shift", "accuracy",
                 "adjacent_accuracy", "mae", "view_ok"]


def _views(paths: Sequence[Path], size: int, workers: int, desc: str, progress: bool,
           render: Callable[[Path, int], Path] | None = None,
           sides: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Views (N,size,size) uint8 of the files (re-rendered first by ``render``) through the one view
    entrance, whether each view was established (ViewInfo.ok), and {index: reason} of the files
    that gave no view at all (their rows of the views are zeros; they are not graded)."""
    from klgrade.ingest.images import ImageReadError
    from klgrade.view.entrance import ViewError, view_file

    out = np.zeros((len(paths), size, size), np.uint8)
    ok = np.zeros(len(paths), bool)
    rejects: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            p = render(paths[i], i) if render else paths[i]
            out[i], info = view_file(p, size, sides[i] if sides else None)
        except (ViewError, ImageReadError) as e:  # reported with the shift, the batch goes on
            rejects[i] = str(e) if str(paths[i]) in str(e) else f"{paths[i]}: {e}"
            return
        ok[i] = info.ok

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(tqdm(pool.map(work, range(len(paths))), total=len(paths), disable=not progress, desc=desc,
                  unit="img", leave=False))
    return out, ok, rejects


def evaluate_robustness(run_dir: str | Path, data: str | Path, split: str = "test", shifts: str = "all",
                        out: str | Path | None = None, device: str = "auto", tta: str | None = None,
                        batch_size: int = 64, workers: int = 2, limit: int | None = None,
                        keep_renders: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """Grade ``split`` of dataset ``data`` clean and under each shift; returns (and, with ``out``,
    writes) {'run', 'data', 'split', 'model', 'n', 'shifts': {name: {description, metrics, view_ok}}}.

    ``limit``: a seeded, patient-agnostic random subset of that many images (quick looks only).
    ``keep_renders``: keep the re-rendered files under ``out/renders/<shift>/``.
    """
    from klgrade.augment.site_shift import SHIFTS, shift_names, write_shifted
    from klgrade.ingest.manifest import image_paths, image_sides, read_manifest, select_split
    from klgrade.runs import load_run

    run_dir = Path(run_dir)
    names = shift_names(shifts)
    df = select_split(read_manifest(data), split)
    if limit is not None and limit < len(df):
        df = df.sample(n=limit, random_state=seed).sort_index()
    paths = [Path(p) for p in image_paths(df)]
    y = df["klg"].astype(int).to_numpy()
    predictor = load_run(run_dir, device=device)
    size, tta = predictor.img_size, tta or predictor.tta
    model_desc = f"{predictor.description} (tta {tta})"
    sides = image_sides(df)
    res: dict = {"run": str(run_dir), "data": str(data), "split": split, "model": model_desc, "n": len(df),
                 "target_drop": TARGET_DROP, "shifts": {}}
    preds: dict[str, np.ndarray] = {}
    if keep_renders and out is None:
        raise ValueError("keep_renders needs an output dir")
    tmp_ctx = tempfile.TemporaryDirectory(prefix="klgrade_robust_")
    with tmp_ctx as tmp:
        root = Path(out) / "renders" if keep_renders else Path(tmp)
        for name in ["clean"] + names:
            if name == "clean":
                render, desc = None, "original files"
            else:
                desc = SHIFTS[name].description

                def render(p: Path, i: int, name=name) -> Path:
                    return write_shifted(p, name, root / name / f"{i:06d}_{p.stem}.png", key=p.stem)

            views, ok, rejects = _views(paths, size, workers, f"views {name}", progress, render, sides)
            graded = np.ones(len(paths), bool)
            graded[list(rejects)] = False
            if not graded.any():
                raise UserError(f"{name}: none of the {len(paths)} images gave a view "
                                f"(first: {rejects[min(rejects)]})")
            probs = predictor.predict_views(views[graded], tta=tta, batch_size=batch_size)
            preds[name] = np.full(len(paths), -1)  # -1: no view, not graded
            preds[name][graded] = probs.argmax(axis=1)
            res["shifts"][name] = {"description": desc, "n": int(graded.sum()), "view_ok": float(ok.mean()),
                                   "rejects": [rejects[i] for i in sorted(rejects)],
                                   "metrics": compute_metrics(y[graded], preds[name][graded], probs)}
    for name, r in res["shifts"].items():  # which way a shift moves the grades (a drop does not say)
        both = (preds[name] >= 0) & (preds["clean"] >= 0)
        r["grade_shift"] = float(np.mean(preds[name][both] - preds["clean"][both])) if both.any() else float("nan")
    if out is not None:
        write_robustness(out, res, df, preds)
    return res


def robustness_table(res: dict) -> pd.DataFrame:
    """One row per condition (clean first): QWK, its drop from clean, the mean change of the predicted
    grade against the clean image (negative: graded lower), accuracy, adjacent accuracy, MAE and the
    share of images whose canonical view was established."""
    clean = res["shifts"]["clean"]["metrics"]["qwk"]
    rows = []
    for name, r in res["shifts"].items():
        m = r["metrics"]
        rows.append({"shift": name, "description": r["description"], "n": r["n"], "qwk": m["qwk"],
                     "qwk_drop": clean - m["qwk"], "grade_shift": r.get("grade_shift", float("nan")),
                     "accuracy": m["accuracy"],
                     "adjacent_accuracy": m["adjacent_accuracy"], "mae": m["mae"], "view_ok": r["view_ok"]})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def table_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    cols = ["shift", "QWK", "drop", "grade shift", "accuracy", "adjacent acc.", "MAE", "view ok", "what"]
    lines = ["| " + " | ".join(cols) + " |", "|:---|" + "---:|" * 7 + ":---|"]
    for _, r in table.iterrows():
        clean = r["shift"] == "clean"
        drop = "" if clean else f"{r['qwk_drop']:+.{digits}f}"
        moved = "" if clean else f"{r['grade_shift']:+.{digits}f}"
        lines.append(f"| {r['shift']} | {r['qwk']:.{digits}f} | {drop} | {moved} | {r['accuracy']:.{digits}f} | "
                     f"{r['adjacent_accuracy']:.{digits}f} | {r['mae']:.{digits}f} | {r['view_ok']:.0%} | "
                     f"{r['description']} |")
    return "\n".join(lines) + "\n"


def figure_robustness(table: pd.DataFrame, title: str = "", target_drop: float = TARGET_DROP):
    """Bar chart of QWK per shift with the clean QWK and the allowed drop marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = float(table.loc[table["shift"] == "clean", "qwk"].iloc[0])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(table) + 2), 3.8))
    colors = ["#4c72b0" if s == "clean" else ("#55a868" if clean - q <= target_drop else "#c44e52")
              for s, q in zip(table["shift"], table["qwk"])]
    ax.bar(range(len(table)), table["qwk"], color=colors)
    ax.axhline(clean, color="#4c72b0", lw=1, ls="--", label=f"clean {clean:.3f}")
    ax.axhspan(clean - target_drop, clean, color="#4c72b0", alpha=0.08, label=f"drop <= {target_drop}")
    ax.set_xticks(range(len(table)), table["shift"], rotation=40, ha="right")
    lo = max(0.0, min(float(table["qwk"].min()), clean - target_drop) - 0.1)
    ax.set_ylim(lo, min(1.0, max(float(table["qwk"].max()), clean) + 0.05))
    ax.set_ylabel("QWK")
    ax.set_title(title or "QWK under site shifts")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def write_robustness(out: str | Path, res: dict, meta: pd.DataFrame | None = None,
                     preds: dict[str, np.ndarray] | None = None) -> dict[str, Path]:
    """robustness.csv/.md/.json and robustness.png (+ predictions_robustness.csv) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = robustness_table(res)
    io.write_csv(out / "robustness.csv", table, float_format="%.4f")
    worst = table[table["shift"] != "clean"]
    head = (f"Robustness of `{res['run']}` ({res['model']}) on `{res['data']}` split `{res['split']}` "
            f"(n = {res['n']}).\n\n")
    tail = ""
    if len(worst):
        w = worst.loc[worst["qwk_drop"].idxmax()]
        tail = (f"\nLargest QWK drop: {w['qwk_drop']:.3f} ({w['shift']}); target <= {res['target_drop']}: "
                f"{'met' if w['qwk_drop'] <= res['target_drop'] else 'NOT met'}.\n")
    io.write_text(out / "robustness.md", head + table_markdown(table) + tail)
    io.write_json(out / "robustness.json", res)
    fig = figure_robustness(table, f"{Path(res['run']).name}: QWK under site shifts (n={res['n']})",
                            res.get("target_drop", TARGET_DROP))
    with io.atomic_path(out / "robustness.png") as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    paths = {k: out / f"robustness.{k}" for k in ("csv", "md", "json", "png")}
    if meta is not None and preds:
        p = pd.DataFrame({"image_id": meta["image_id"].astype(str).to_numpy(),
                          "klg": meta["klg"].astype(int).to_numpy()})
        for name, pr in preds.items():
            p[f"pred_{name}"] = pr
        io.write_csv(out / "predictions_robustness.csv", p)
        paths["predictions"] = out / "predictions_robustness.csv"
    return paths
