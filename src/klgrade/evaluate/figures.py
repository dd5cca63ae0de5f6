"""Figures 1 and 2 of the study's report (matplotlib Figure objects, saved as PNG + SVG).

Split out of klgrade.evaluate.report; ``compare_runs`` there draws and saves these.
"""
from __future__ import annotations

import io as _io
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade import io
from klgrade.evaluate import metrics as M
from klgrade.evaluate import stats as S

GRADE_LABELS = [f"KL{g}" for g in M.GRADES]


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects directly: no pyplot global state, no backend switching)
# ----------------------------------------------------------------------------------------------
def _save(fig, out_dir: Path, stem: str, dpi: int = 200) -> tuple[dict[str, str], bytes]:
    """PNG + SVG, atomically; returns paths and the PNG bytes (for embedding in HTML)."""
    paths = {}
    png = b""
    for fmt in ("png", "svg"):
        buf = _io.BytesIO()
        # Constrained layout already fits everything in the canvas (no bbox_inches="tight", which
        # would draw twice); after the first save the layout is frozen so the SVG skips re-solving it.
        fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
        fig.set_layout_engine("none")
        io.write_bytes(out_dir / f"{stem}.{fmt}", buf.getvalue())
        paths[fmt] = str(out_dir / f"{stem}.{fmt}")
        if fmt == "png":
            png = buf.getvalue()
    return paths, png


def _annotate(ax, mat: np.ndarray, fmt: str, vmax: float) -> None:
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            v = mat[i, j]
            dark = vmax > 0 and v / vmax > 0.55
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")


def figure_confusion(point: Mapping[str, Mapping], title: str = "") -> object:
    """Figure 1: one column per run; counts (top) and row-normalised = recall (bottom)."""
    from matplotlib.figure import Figure

    names = list(point)
    cms = {r: np.asarray(point[r]["confusion"], float) for r in names}
    norm = {}
    for r, cm in cms.items():
        rows = cm.sum(axis=1, keepdims=True)
        norm[r] = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(names)
    fig = Figure(figsize=(3.3 * n + 1.3, 6.9), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    count_max = max(float(cm.max()) for cm in cms.values()) or 1.0
    for row, (mats, vmax, fmt, cmap, cbar_label) in enumerate((
            (cms, count_max, ".0f", "Blues", "images"),
            (norm, 1.0, ".2f", "Blues", "share of true grade (row)"))):
        im = None
        for j, r in enumerate(names):
            ax = axes[row, j]
            im = ax.imshow(mats[r], cmap=cmap, vmin=0, vmax=vmax)
            _annotate(ax, mats[r], fmt, vmax)
            ax.set_xticks(range(M.N_GRADES), GRADE_LABELS, fontsize=9)
            ax.set_yticks(range(M.N_GRADES), GRADE_LABELS, fontsize=9)
            ax.set_xlabel("Predicted grade", fontsize=10)
            if j == 0:
                ax.set_ylabel("True grade", fontsize=10)
            kind = "counts" if row == 0 else "row-normalised"
            ax.set_title(f"{r}\n({kind})", fontsize=11)
        cb = fig.colorbar(im, ax=list(axes[row, :]), shrink=0.85, pad=0.02)
        cb.set_label(cbar_label, fontsize=9)
        cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def read_history(run_dir: str | Path) -> pd.DataFrame | None:
    """history.csv of a run, or None when absent/unreadable/empty (learning curves are optional)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    return df if len(df) else None


CURVE_COLUMNS = {"train_loss": ("loss", "-"), "val_loss": ("loss", "--"), "val_qwk": ("qwk", "-")}


def figure_curves_and_calibration(histories: Mapping[str, pd.DataFrame | None],
                                  aligned: S.Aligned, point: Mapping[str, Mapping], title: str = "") -> object:
    """Figure 2: learning curves (top, when any run has history.csv) and reliability diagrams."""
    from matplotlib.figure import Figure

    names = aligned.names
    has_curves = any(h is not None and any(c in h.columns for c in CURVE_COLUMNS) for h in histories.values())
    n_rows = 2 if has_curves else 1
    fig = Figure(figsize=(3.6 * len(names) + 0.6, 3.5 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, len(names), squeeze=False)
    if has_curves:
        for j, r in enumerate(names):
            _plot_history(axes[0, j], histories.get(r), r)
    for j, r in enumerate(names):
        _plot_reliability(axes[-1, j], aligned.probs[r], aligned.y_true, r, point[r].get("ece"))
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _plot_history(ax, hist: pd.DataFrame | None, name: str) -> None:
    ax.set_title(f"{name}\nlearning curves", fontsize=11)
    cols = [c for c in CURVE_COLUMNS if hist is not None and c in hist.columns]
    if not cols:
        ax.text(0.5, 0.5, "no history.csv", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    x = hist["epoch"] if "epoch" in hist.columns else pd.Series(np.arange(1, len(hist) + 1))
    handles = []
    for c in cols:
        if CURVE_COLUMNS[c][0] == "loss":
            handles += ax.plot(x, hist[c], CURVE_COLUMNS[c][1], marker="o", ms=3, label=c)
    ax.set_xlabel("epoch", fontsize=10)
    ax.set_ylabel("loss", fontsize=10)
    if "val_qwk" in cols:
        ax2 = ax.twinx() if any(CURVE_COLUMNS[c][0] == "loss" for c in cols) else ax
        handles += ax2.plot(x, hist["val_qwk"], color="tab:green", marker="s", ms=3, label="val_qwk")
        ax2.set_ylabel("validation QWK", fontsize=10)
        ax2.set_ylim(min(0.0, float(np.nanmin(hist["val_qwk"]))), 1.0)
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _plot_reliability(ax, probs: np.ndarray, y_true: np.ndarray, name: str, ece: float | None) -> None:
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    rb = M.reliability_bins(conf, correct)
    edges = np.asarray(rb["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    acc = np.nan_to_num(np.asarray(rb["accuracy"], float))
    ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.8, edgecolor="white", label="accuracy")
    # Mean confidence as a tick over each bar: the gap between tick and bar top is miscalibration.
    mconf = np.asarray(rb["confidence"], float)
    ax.plot(centres, mconf, ls="none", marker="_", ms=16, mew=2.5, color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for c, k in zip(centres, rb["count"]):
        if k:
            ax.text(c, 0.015, str(k), ha="center", va="bottom", fontsize=6, color="white", rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top class)", fontsize=10)
    ax.set_ylabel("accuracy", fontsize=10)
    sub = f"ECE {ece:.3f}" if ece is not None and math.isfinite(ece) else "reliability"
    ax.set_title(f"{name}\nreliability ({sub})", fontsize=11)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
