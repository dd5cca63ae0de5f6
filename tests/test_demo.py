"""A reduced `klgrade demo` end to end: synth -> split -> train -> embed -> head -> compare -> report."""
import json

import pandas as pd

from klgrade.cli import main
from klgrade.evaluate.metrics import compute_metrics


def test_reduced_demo_end_to_end(tmp_path, tiny_biomedclip, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--patients", "40", "--epochs", "2", "--img-size", "32",
               "--n-boot", "30", "--cnns", "test_resnet,test_convnext", "--embed-weights", str(tiny_biomedclip)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = out / "report"
    assert f"Report: {(report / 'report.html').resolve()}" in printed
    assert "randomly initialised" in printed
    html = (report / "report.html").read_text()
    assert "pipeline check" in html  # the random-weights banner is in the report itself
    for name in ("table1.md", "table1.csv", "table1.tex", "figure1_confusion.png", "stats.json"):
        assert (report / name).is_file(), name
    # Table 1 carries the metrics module's numbers for every approach
    stats = json.loads((report / "stats.json").read_text())
    runs = ["test_resnet", "test_convnext", "biomedclip_mlp"]
    for run in runs:
        preds = pd.read_csv(out / "runs" / run / "predictions_test.csv")
        expected = compute_metrics(preds["klg"], preds["pred"])
        got = next(v for k, v in stats["metrics"].items() if run in k)
        assert got["qwk"] == expected["qwk"]
    # every approach was scored on the same patient-level test split
    ids = [set(pd.read_csv(out / "runs" / r / "predictions_test.csv")["image_id"]) for r in runs]
    assert ids[0] == ids[1] == ids[2]
    man = pd.read_csv(out / "data" / "manifest.csv", dtype=str)
    assert (man.groupby("patient_id")["split"].nunique() == 1).all()
