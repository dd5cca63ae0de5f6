"""`klgrade compare` end to end on fake run dirs (no training): Table 1, figures, stats.json, HTML."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from klgrade import io
from klgrade.cli import main
from klgrade.evaluate.metrics import compute_metrics
from klgrade.evaluate.report import TABLE1_ROWS, compare_runs
from klgrade.rundir import PROB_COLUMNS, read_predictions, write_predictions

RUNS = (("convnext", 0.85, "auto"), ("resnet18", 0.7, "auto"), ("biomedclip_mlp", 0.45, None))


def make_cohort(n_patients=50, per_patient=4, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient)
    klg = np.repeat(rng.integers(0, 5, n_patients), per_patient)
    return pd.DataFrame({"image_id": [f"img{k:04d}" for k in range(len(pid))], "patient_id": pid, "klg": klg})


def make_run(run_dir: Path, meta: pd.DataFrame, acc: float, seed: int, config: dict | None = None,
             history: bool = True, split: str = "test") -> Path:
    rng = np.random.default_rng(seed)
    y = meta["klg"].to_numpy()
    pred = np.where(rng.random(len(y)) < acc, y, np.clip(y + rng.choice([-1, 1, 2], len(y)), 0, 4))
    probs = rng.dirichlet(np.ones(5), len(y)) * 0.4
    probs[np.arange(len(y)), pred] += 0.6
    write_predictions(run_dir, split, meta, probs)
    io.write_yaml(run_dir / "config.yaml", {"name": run_dir.name, "kind": "cnn", "model": run_dir.name,
                                            **(config or {})})
    if history:
        io.write_csv(run_dir / "history.csv", pd.DataFrame({
            "epoch": [1, 2, 3], "train_loss": [1.4, 1.0, 0.8], "val_loss": [1.3, 1.1, 1.0],
            "val_qwk": [0.4, 0.6, 0.7], "lr": [1e-3, 1e-3, 1e-4]}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    meta = make_cohort()
    out = []
    for i, (name, acc, weights) in enumerate(RUNS):
        # class_weights: none is a loss option, not random init: it must not raise a banner.
        cfg = {"weights": weights, "class_weights": "none"} if weights else {"kind": "head", "backbone": "biomedclip",
                                                     "embedder": {"weights": "none"}}
        out.append(make_run(root / name, meta, acc, seed=i + 1, config=cfg, history=name != "biomedclip_mlp"))
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = compare_runs(runs, split="test", out_dir=out, names=["ConvNeXt", "ResNet18", "BioMedCLIP+NN"],
                          n_boot=300, seed=0, progress=False)
    return out, result


def test_table1_equals_metrics_module(runs, report):
    out, _ = report
    table = pd.read_csv(out / "table1.csv", dtype={"Grade": str})
    assert list(table.columns) == ["Metric", "Grade", "ConvNeXt", "ResNet18", "BioMedCLIP+NN"]
    assert [(m, g) for m, g, _ in TABLE1_ROWS] == list(zip(table["Metric"], table["Grade"]))
    # Study shape: P/R/F1 x grades 0-4, then Adj. Acc and QW Kappa first among the overall metrics.
    assert list(table["Grade"][:15]) == [str(g) for g in range(5)] * 3
    assert list(table["Grade"][15:17]) == ["Adj. Acc", "QW Kappa"]
    for run_dir, col in zip(runs, table.columns[2:]):
        p = read_predictions(run_dir, "test")
        ref = compute_metrics(p["klg"], p["pred"], p[PROB_COLUMNS].to_numpy())
        expected = [ref[m[1]][int(m[2])] if (m := re.fullmatch(r"(precision|recall|f1)_(\d)", k)) else ref[k]
                    for _, _, k in TABLE1_ROWS]
        np.testing.assert_allclose(table[col].to_numpy(), expected, rtol=0, atol=1e-12)
    md = (out / "table1.md").read_text()
    assert "| Overall Metrics | Adj. Acc |" in md and "|  | QW Kappa |" in md
    tex = (out / "table1.tex").read_text()
    assert r"\toprule" in tex and "BioMedCLIP+NN" in tex and tex.count(r"\midrule") == 4


def test_ci_table_and_stats_json(runs, report):
    out, result = report
    stats = json.loads((out / "stats.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert stats["n_images"] == 200 and stats["n_patients"] == 50
    assert stats["n_boot"] == 300 and stats["seed"] == 0 and stats["split"] == "test"
    assert stats["bootstrap_unit"] == "patient"
    assert [r["path"] for r in stats["runs"]] == [str(r.resolve()) for r in runs]
    iv = stats["intervals"]["ConvNeXt"]["qwk"]
    assert iv["low"] <= iv["estimate"] <= iv["high"]
    assert iv["estimate"] == stats["metrics"]["ConvNeXt"]["qwk"]
    assert len(stats["pairwise"]) == 3
    first = stats["pairwise"][0]
    assert {"qwk", "adjacent_accuracy", "accuracy", *(f"f1_{g}" for g in range(5))} == set(first["differences"])
    f1a, f1b = stats["metrics"][first["a"]]["f1"], stats["metrics"][first["b"]]["f1"]
    d1 = first["differences"]["f1_1"]  # where a gap sits: per-grade F1 differences, paired
    assert d1["difference"] == pytest.approx(f1a[1] - f1b[1]) and d1["low"] <= d1["difference"] <= d1["high"]
    ci = pd.read_csv(out / "table1_ci.csv", dtype=str)
    cell = ci.loc[ci["Grade"] == "QW Kappa", "ConvNeXt"].item()
    assert re.fullmatch(r"\d\.\d{3} \(\d\.\d{2}–\d\.\d{2}\)", cell)
    assert cell.startswith(f"{iv['estimate']:.3f} ({iv['low']:.2f}")


def test_figures_are_print_quality(report):
    out, _ = report
    for stem in ("figure1_confusion", "figure2_curves_calibration"):
        with Image.open(out / f"{stem}.png") as im:
            assert min(im.info["dpi"]) >= 199
            assert im.size[0] > 1500
        svg = (out / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    svg1 = (out / "figure1_confusion.svg").read_text()
    for text in ("KL0", "KL4", "ConvNeXt", "BioMedCLIP+NN", "Predicted grade", "True grade", "row-normalised"):
        assert text in svg1, text
    assert "no history.csv" in (out / "figure2_curves_calibration.svg").read_text()


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links, self.tables = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "src" in a:
            self.srcs.append(a["src"])
        if tag in ("link", "script"):
            self.links.append(tag)
        self.tables += tag == "table"


def test_report_html_is_self_contained_with_banner(report):
    out, result = report
    text = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(text)
    assert len(parser.srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert parser.links == []
    assert parser.tables >= 5  # runs, Table 1, CI table, calibration, pairwise, McNemar
    # The head run's nested embedder weights are random: the report must say so prominently.
    assert "class='banner'" in text and "pipeline check" in text
    assert result["banners"] == ["Run 'BioMedCLIP+NN' uses randomly initialised weights (embedder.weights: none): "
                                 "its numbers are a pipeline check, not the study's answer."]
    assert "Table 1. Performance metrics for each KL grade" in text


def test_notes_become_banners_and_pretrained_runs_add_none(runs, tmp_path):
    res = compare_runs(runs[:1], out_dir=tmp_path / "b", n_boot=50, progress=False, notes="synthetic demo data")
    assert res["banners"] == ["synthetic demo data"]  # runs[0] has weights: auto -> no banner of its own
    assert res["pairwise"] == [] and res["n_images"] == 200


def test_cli_compare_is_reproducible(runs, report, tmp_path, capsys):
    out, result = report
    rc = main(["compare", *map(str, runs), "--split", "test", "--out", str(tmp_path / "r"),
               "--names", "ConvNeXt,ResNet18,BioMedCLIP+NN", "--n-boot", "300", "--seed", "0", "--no-progress",
               "--title", "My study"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Overall Metrics | Adj. Acc |" in printed and "QWK ConvNeXt - ResNet18" in printed
    assert "NOTE: Run 'BioMedCLIP+NN' uses randomly initialised weights" in printed
    assert str((tmp_path / "r" / "report.html").resolve()) in printed
    assert "<h1>My study</h1>" in (tmp_path / "r" / "report.html").read_text()
    again = json.loads((tmp_path / "r" / "stats.json").read_text())
    first = json.loads((out / "stats.json").read_text())
    assert again["intervals"] == first["intervals"] and again["pairwise"] == first["pairwise"]
    assert (tmp_path / "r" / "table1.csv").read_text() == (out / "table1.csv").read_text()


def test_cli_refuses_misaligned_runs(runs, tmp_path, capsys):
    other = make_run(tmp_path / "other", make_cohort(n_patients=49), 0.8, seed=9)
    rc = main(["compare", str(runs[0]), str(other), "--out", str(tmp_path / "r"), "--n-boot", "10"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "different images" in err and "'convnext' has 200 images, 'other' has 196" in err
    assert not (tmp_path / "r" / "stats.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--names", "only-one"], "--names must give 2"),
    (["--n-boot", "0"], "--n-boot must be >= 1"),
    (["--split", "val"], "no predictions for split 'val'"),
])
def test_cli_bad_options(runs, tmp_path, capsys, argv, message):
    rc = main(["compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "r"), *argv])
    assert rc == 1
    assert message in capsys.readouterr().err
