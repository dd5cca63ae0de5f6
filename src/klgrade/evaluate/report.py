"""The study's report: Table 1, Figure 1, Figure 2, stats.json and a self-contained report.html.

``compare_runs`` is the whole of ``klgrade compare``: read run dirs, align their predictions,
compute the reference metrics (klgrade.evaluate.metrics) and patient-level bootstrap statistics
(klgrade.evaluate.stats), and write every artifact atomically into one folder.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade import io
from klgrade.evaluate import metrics as M
from klgrade.evaluate import stats as S
from klgrade.evaluate.figures import (  # noqa: F401  (re-exported)
    CURVE_COLUMNS,
    GRADE_LABELS,
    _save,
    figure_confusion,
    figure_curves_and_calibration,
    read_history,
)
from klgrade.rundir import RunError, read_config, read_predictions, run_name

# Table 1 in the study's shape: (Metric group, Grade/label, key into flattened metrics).
TABLE1_ROWS: list[tuple[str, str, str]] = (
    [("Precision", str(g), f"precision_{g}") for g in M.GRADES]
    + [("Recall", str(g), f"recall_{g}") for g in M.GRADES]
    + [("F1-score", str(g), f"f1_{g}") for g in M.GRADES]
    + [("Overall Metrics", "Adj. Acc", "adjacent_accuracy"), ("Overall Metrics", "QW Kappa", "qwk"),
       ("Overall Metrics", "Accuracy", "accuracy"), ("Overall Metrics", "Balanced Acc", "balanced_accuracy"),
       ("Overall Metrics", "MAE", "mae"), ("Overall Metrics", "Macro F1", "macro_f1")]
)
CALIBRATION_ROWS = [("Calibration", "ECE", "ece"), ("Calibration", "Brier", "brier"),
                    ("Calibration", "Log loss", "log_loss")]
METRIC_LABELS = {"qwk": "QW Kappa", "adjacent_accuracy": "Adj. Acc", "accuracy": "Accuracy",
                 **{f"f1_{g}": f"F1 KL{g}" for g in range(5)}}
_RANDOM_WEIGHTS = {"none", "random", "scratch", "random-init", "random_init"}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def table1_frame(point: Mapping[str, Mapping], rows=TABLE1_ROWS) -> pd.DataFrame:
    """Columns Metric, Grade, one per run; values straight from compute_metrics (unrounded)."""
    flat = {r: S.flatten_metrics(m) for r, m in point.items()}
    data = [{"Metric": grp, "Grade": lab, **{r: float(flat[r][key]) for r in flat}}
            for grp, lab, key in rows if all(key in f for f in flat.values())]
    return pd.DataFrame(data, columns=["Metric", "Grade", *point])


def table1_ci_frame(intervals: Mapping[str, Mapping], rows=TABLE1_ROWS, digits: int = 3,
                    ci_digits: int = 2) -> pd.DataFrame:
    """Same shape as Table 1 with cells like '0.809 (0.78–0.83)'."""
    data = []
    for grp, lab, key in rows:
        if not all(key in iv for iv in intervals.values()):
            continue
        data.append({"Metric": grp, "Grade": lab,
                     **{r: format_ci(iv[key], digits, ci_digits) for r, iv in intervals.items()}})
    return pd.DataFrame(data, columns=["Metric", "Grade", *intervals])


def format_ci(iv: Mapping, digits: int = 3, ci_digits: int = 2) -> str:
    est = _fmt(iv["estimate"], digits)
    if not (math.isfinite(iv["low"]) and math.isfinite(iv["high"])):
        return est
    return f"{est} ({_fmt(iv['low'], ci_digits)}–{_fmt(iv['high'], ci_digits)})"


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _display(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Rounded strings; the Metric label only on the first row of its group, as in the study."""
    out = df.copy()
    for c in out.columns[2:]:
        out[c] = [_fmt(v, digits) for v in out[c]]
    out["Metric"] = [m if i == 0 or m != out["Metric"].iloc[i - 1] else "" for i, m in enumerate(out["Metric"])]
    return out


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    d = _display(df, digits)
    esc = [str(c).replace("|", "\\|") for c in d.columns]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * (len(esc) - 2)) + "|"]
    for _, row in d.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}


def _tex(s) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def to_latex(df: pd.DataFrame, caption: str, label: str, digits: int = 3) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); a rule between metric groups."""
    d = _display(df, digits)
    cols = "ll" + "r" * (len(d.columns) - 2)
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex(c) for c in d.columns) + r" \\", r"\midrule"]
    for i, (_, row) in enumerate(d.iterrows()):
        if i > 0 and row["Metric"]:
            lines.append(r"\midrule")
        lines.append(" & ".join(_tex(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, stem: str, df: pd.DataFrame, caption: str, note: str = "",
                csv_df: pd.DataFrame | None = None) -> dict[str, str]:
    """<stem>.md, <stem>.csv (full precision) and <stem>.tex; returns their paths."""
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "tex")}
    io.write_text(paths["md"], f"**{caption}**\n\n" + to_markdown(df) + (f"\n{note}\n" if note else ""))
    io.write_csv(paths["csv"], df if csv_df is None else csv_df)
    io.write_text(paths["tex"], to_latex(df, caption + (f" {note}" if note else ""), f"tab:{stem}"))
    return {ext: str(p) for ext, p in paths.items()}


# ----------------------------------------------------------------------------------------------
# Banners: random-weight runs make the numbers a pipeline check, not the study's answer
# ----------------------------------------------------------------------------------------------
# Keys that name a model's initial weights. Deliberately not every "*_weights": e.g. a train
# config's ``class_weights: none`` is about the loss, not about random initialisation.
_WEIGHT_KEYS = {"weights", "backbone_weights", "embedder_weights", "pretrained_weights", "init_weights"}


def _random_weight_keys(cfg, prefix: str = "") -> list[str]:
    """Config keys (at any depth) naming initial weights whose value says random initialisation."""
    found = []
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                found += _random_weight_keys(v, key + ".")
            elif str(k) in _WEIGHT_KEYS and isinstance(v, str) and v.strip().lower() in _RANDOM_WEIGHTS:
                found.append(f"{key}: {v}")
    return found


def run_banners(name: str, cfg: Mapping) -> list[str]:
    out = []
    keys = _random_weight_keys(cfg)
    if keys and cfg.get("kind", "cnn") == "cnn":
        # a CNN trained from scratch is a real task-specific model, only without pretraining
        out.append(f"Run '{name}' starts from randomly initialised weights ({'; '.join(keys)}): a CNN "
                   f"trained from scratch, no pretraining.")
    elif keys:
        out.append(f"Run '{name}' uses randomly initialised weights ({'; '.join(keys)}): its numbers are a "
                   f"pipeline check, not the study's answer.")
    for field in ("banner", "notes"):
        val = cfg.get(field)
        if isinstance(val, str) and val.strip():
            out.append(f"Run '{name}': {val.strip()}")
        elif isinstance(val, list):
            out += [f"Run '{name}': {v}" for v in val if str(v).strip()]
    return out


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}tr.grp td{border-top:2px solid #888}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.8em 1em;margin:1em 0;font-weight:600}
.muted{color:#666;font-size:.9em}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 .25em}
"""


def _html_table(df: pd.DataFrame, digits: int = 3, left: int = 2) -> str:
    d = _display(df, digits) if df.shape[1] > 2 and df.columns[0] == "Metric" else df.astype(str)
    e = html.escape
    head = "".join(f'<th class="{"l" if i < left else ""}">{e(str(c))}</th>' for i, c in enumerate(d.columns))
    body = []
    for _, row in d.iterrows():
        cls = ' class="grp"' if d.columns[0] == "Metric" and row.iloc[0] and body else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{e(str(v))}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def pairwise_frame(pairwise: Sequence[Mapping], ci: float) -> pd.DataFrame:
    rows = []
    for p in pairwise:
        for key, d in p["differences"].items():
            rows.append({"A": p["a"], "B": p["b"], "Metric": METRIC_LABELS.get(key, key),
                         "A value": _fmt(d["a"]), "B value": _fmt(d["b"]),
                         "A − B": _fmt(d["difference"]),
                         f"{round(ci * 100)}% CI": f"{_fmt(d['low'])} to {_fmt(d['high'])}",
                         "p (bootstrap)": _fmt_p(d["p_value"])})
    return pd.DataFrame(rows)


def mcnemar_frame(pairwise: Sequence[Mapping]) -> pd.DataFrame:
    rows = []
    for p in pairwise:
        m = p["mcnemar"]
        rows.append({"A": p["a"], "B": p["b"], "A right, B wrong": m["a_correct_b_wrong"],
                     "A wrong, B right": m["a_wrong_b_correct"], "test": m["method"],
                     "statistic": _fmt(m["statistic"], 2), "p": _fmt_p(m["p_value"])})
    return pd.DataFrame(rows)


def render_html(result: Mapping, tables: Mapping[str, pd.DataFrame], figures: Mapping[str, bytes]) -> str:
    e = html.escape
    ci_pct = round(result["ci"] * 100)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(result['title'])}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(result['title'])}</h1>",
             f"<p class='muted'>klgrade {e(result['klgrade_version'])} · {e(result['created'])} · split "
             f"<code>{e(result['split'])}</code> · {result['n_images']} images from {result['n_patients']} "
             f"patients · {result['n_boot']} patient-level bootstrap replicates, seed {result['seed']}</p>"]
    for b in result["banners"]:
        parts.append(f"<div class='banner'>⚠ {e(b)}</div>")
    runs = pd.DataFrame([{"Name": r["name"], "Kind": r.get("kind") or "—", "Model": r.get("model") or "—",
                          "Weights": r.get("weights") or "—", "Run dir": r["path"]} for r in result["runs"]])
    support = ", ".join(f"KL{g}: {n}" for g, n in zip(M.GRADES, result["support"]))
    parts += ["<h2>Runs</h2>", _html_table(runs, left=5), f"<p class='muted'>Images per true grade: {e(support)}</p>",
              "<h2>Table 1. Performance metrics for each KL grade</h2>", _html_table(tables["table1"]),
              f"<h2>Table 1 with {ci_pct}% confidence intervals</h2>", _html_table(tables["table1_ci"]),
              f"<p class='muted'>Estimate ({ci_pct}% percentile interval from {result['n_boot']} bootstrap "
              f"resamples of patients).</p>"]
    if "calibration" in tables and len(tables["calibration"]):
        parts += ["<h2>Calibration</h2>", _html_table(tables["calibration"])]
    if result["pairwise"]:
        parts += ["<h2>Paired comparisons</h2>", _html_table(tables["pairwise"], left=3),
                  "<p class='muted'>Differences A − B on the same images; CI and two-sided p-value from the "
                  "same paired patient-level bootstrap (p &lt; 0.05 ≈ the 95% interval excludes 0).</p>",
                  "<h3>McNemar's test on per-image correctness</h3>", _html_table(tables["mcnemar"], left=2),
                  "<p class='muted'>Exact binomial test when there are fewer than "
                  f"{S.EXACT_MCNEMAR_BELOW} discordant images, else chi-square with continuity correction. "
                  "McNemar treats images as independent; with several knees and visits per patient prefer "
                  "the patient-level bootstrap p-values above.</p>"]
    parts += ["<h2>Figure 1. Confusion matrices</h2>", _img(figures["figure1"], "Confusion matrices")]
    parts += ["<h2>Figure 2. Learning curves and calibration</h2>", _img(figures["figure2"], "Learning curves")]
    parts += ["<h2>Methods</h2><p>Metrics are computed by <code>klgrade.evaluate.metrics</code>: precision, "
              "recall and F1 per KL grade (0 where undefined), adjacent accuracy (|predicted − true| ≤ 1), "
              "quadratic weighted Cohen's kappa over grades 0–4, accuracy, balanced accuracy (mean recall "
              "over grades present), mean absolute error in grades; calibration of the top-class "
              "probability (10-bin ECE, Brier score, log loss). Confidence intervals resample "
              "<em>patients</em> with replacement (all images of a drawn patient enter the resample), "
              "because a patient's knees and visits are correlated; all runs share the same resamples, "
              "which makes the differences paired.</p>",
              f"<p class='muted'>Files: {e(', '.join(sorted(Path(p).name for p in result['files'].values())))}"
              "</p></body></html>"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------
def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def compare_runs(run_dirs: Sequence[str | Path], split: str = "test", out_dir: str | Path = "report",
                 names: Sequence[str] | str | None = None, n_boot: int = 2000, seed: int = 0,
                 ci: float = 0.95, title: str | None = None, notes: str | Sequence[str] | None = None,
                 progress: bool = True) -> dict:
    """Compare run dirs on one split and write the full report into ``out_dir``.

    Returns the stats.json content (with a "files" entry listing every artifact). Raises RunError
    (or its subclass stats.AlignmentError) for unusable or misaligned runs, ValueError for bad options.
    """
    import klgrade

    run_dirs = [Path(r) for r in run_dirs]
    names = _checked_names(run_dirs, names, n_boot, ci)
    configs = {}
    for n, r in zip(names, run_dirs):
        try:
            configs[n] = read_config(r) or {}
        except RunError:
            configs[n] = {}
    frames = {n: read_predictions(r, split) for n, r in zip(names, run_dirs)}
    aligned = S.align_predictions(frames)
    analysis = S.analyse(aligned, n_boot=n_boot, seed=seed, ci=ci, progress=progress)
    point = analysis["point"]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    banners = [notes] if isinstance(notes, str) else list(notes or [])
    for n in names:
        banners += run_banners(n, configs[n])
    tables = {"table1": table1_frame(point), "table1_ci": table1_ci_frame(analysis["intervals"]),
              "calibration": table1_ci_frame(analysis["intervals"], rows=CALIBRATION_ROWS),
              "pairwise": pairwise_frame(analysis["pairwise"], ci), "mcnemar": mcnemar_frame(analysis["pairwise"])}
    histories = {n: read_history(r) for n, r in zip(names, run_dirs)}
    files, pngs = _write_tables_and_figures(out_dir, tables, point, aligned, histories, split, ci)

    result = {
        "title": title or f"KL grading: {' vs '.join(names)} ({split} split)",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "klgrade_version": getattr(klgrade, "__version__", "?"),
        "split": split, "n_images": aligned.n_images, "n_patients": aligned.n_patients,
        "support": [int(x) for x in np.bincount(aligned.y_true, minlength=M.N_GRADES)],
        "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci), "bootstrap_unit": "patient",
        "ci_method": "percentile",
        "runs": [{"name": n, "path": str(r.resolve()), "kind": configs[n].get("kind"),
                  "model": configs[n].get("model") or configs[n].get("backbone"),
                  "weights": None if configs[n].get("weights") is None else str(configs[n].get("weights"))}
                 for n, r in zip(names, run_dirs)],
        "banners": banners,
        "metrics": point,
        "intervals": analysis["intervals"],
        "pairwise": analysis["pairwise"],
        "files": files,
    }
    io.write_json(out_dir / "stats.json", _json_safe(result))
    io.write_text(out_dir / "report.html", render_html(result, tables, pngs))
    return result


def _checked_names(run_dirs: list[Path], names, n_boot: int, ci: float) -> list[str]:
    """The display names of ``run_dirs`` (given or from the runs), after checking the options."""
    if not run_dirs:
        raise RunError("compare needs at least one run dir")
    if n_boot < 1:
        raise ValueError(f"--n-boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"--ci must lie strictly between 0 and 1, got {ci}")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if names is not None and len(names) != len(run_dirs):
        raise RunError(f"--names gives {len(names)} name(s) for {len(run_dirs)} run(s)")
    for r in run_dirs:
        if not r.is_dir():
            raise RunError(f"{r}: no such run dir")
    return _unique_names(list(names) if names is not None else [run_name(r) for r in run_dirs])


def _write_tables_and_figures(out_dir: Path, tables: dict, point: dict, aligned, histories: dict,
                              split: str, ci: float) -> tuple[dict[str, str], dict[str, str]]:
    """Table 1 (plain and with CIs) and Figures 1-2 into ``out_dir``: ({artifact: path}, {figure: png})."""
    note = f"n = {aligned.n_images} images from {aligned.n_patients} patients ({split} split)."
    files: dict[str, str] = {}
    for stem, caption in (("table1", "Table 1. Performance metrics for each KL grade."),
                          ("table1_ci", f"Table 1 with {round(ci * 100)}% patient-level bootstrap "
                                        f"confidence intervals.")):
        written = write_table(out_dir, stem, tables[stem], caption, note)
        files.update({f"{stem}_{ext}": p for ext, p in written.items()})
    fig1 = figure_confusion(point, title="Figure 1. Confusion matrices")
    paths1, png1 = _save(fig1, out_dir, "figure1_confusion")
    fig2 = figure_curves_and_calibration(histories, aligned, point,
                                         title="Figure 2. Learning curves and reliability diagrams")
    paths2, png2 = _save(fig2, out_dir, "figure2_curves_calibration")
    files.update({f"figure1_{k}": v for k, v in paths1.items()})
    files.update({f"figure2_{k}": v for k, v in paths2.items()})
    files["stats_json"] = str(out_dir / "stats.json")
    files["report_html"] = str(out_dir / "report.html")
    return files, {"figure1": png1, "figure2": png2}


def _json_safe(obj):
    """NaN/inf -> null so stats.json is strict JSON any tool can read."""
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj
