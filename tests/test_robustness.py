"""`klgrade robustness` on a tiny trained run; foreign encodings get the same grade."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from klgrade.cli import main


@pytest.fixture(scope="module")
def tiny_run(synth_png, tmp_path_factory):
    run = tmp_path_factory.mktemp("robust") / "run"
    rc = main(["train", "--data", str(synth_png), "--model", "test_resnet", "--weights", "none",
               "--epochs", "1", "--img-size", "48", "--batch-size", "16", "--device", "cpu",
               "--out", str(run)])
    assert rc == 0
    return run


def test_robustness_command_writes_table(tiny_run, synth_png, tmp_path):
    out = tmp_path / "rob"
    rc = main(["robustness", "--run", str(tiny_run), "--data", str(synth_png), "--split", "test",
               "--shifts", "zoom_out_30,gamma_1.6,bit16", "--limit", "16", "--workers", "1",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    table = pd.read_csv(out / "robustness.csv")
    assert table["shift"].tolist() == ["clean", "zoom_out_30", "gamma_1.6", "bit16"]
    assert (table["n"] == 16).all() and table["qwk_drop"].iloc[0] == 0
    assert table[["qwk", "accuracy", "adjacent_accuracy"]].notna().all().all()
    preds = pd.read_csv(out / "predictions_robustness.csv")
    for shift in ("zoom_out_30", "gamma_1.6", "bit16"):  # the mean change of each image's grade
        moved = (preds[f"pred_{shift}"] - preds["pred_clean"]).mean()
        assert table.set_index("shift").loc[shift, "grade_shift"] == pytest.approx(moved, abs=1e-4)
    assert table["grade_shift"].iloc[0] == 0
    for ext in ("md", "json", "png"):
        assert (out / f"robustness.{ext}").stat().st_size > 0
    assert "| clean |" in (out / "robustness.md").read_text()


def test_a_file_without_a_view_is_reported_and_the_rest_graded(tiny_run, synth_png, tmp_path, capsys):
    import shutil

    from klgrade.ingest.manifest import image_paths, read_manifest, select_split

    data = tmp_path / "data"
    shutil.copytree(synth_png, data)
    test = select_split(read_manifest(data), "test")
    broken = image_paths(test)[3]
    open(broken, "wb").write(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "rob"
    rc = main(["robustness", "--run", str(tiny_run), "--data", str(data), "--split", "test",
               "--shifts", "gamma_1.6", "--workers", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"1 of {len(test)} images gave no view" in err and broken.name in err and "Traceback" not in err
    table = pd.read_csv(out / "robustness.csv")
    assert (table["n"] == len(test) - 1).all() and table["qwk"].notna().all()
    preds = pd.read_csv(out / "predictions_robustness.csv")
    assert (preds["pred_clean"] == -1).sum() == 1 and (preds["pred_gamma_1.6"] == -1).sum() == 1


def test_16bit_and_rgb_files_get_the_same_grade(tiny_run, synth_png, tmp_path):
    from klgrade.augment.site_shift import write_shifted
    from klgrade.ingest.manifest import image_paths, read_manifest, select_split
    from klgrade.runs.cnn import load_cnn_run, predict_views
    from klgrade.view.entrance import load_view

    loaded = load_cnn_run(tiny_run, device="cpu")
    paths = image_paths(select_split(read_manifest(synth_png), "test"))[:8]
    grades = {}
    for enc in ("orig", "bit16", "rgb"):
        files = paths if enc == "orig" else [write_shifted(p, enc, tmp_path / enc / f"{i}.png")
                                             for i, p in enumerate(paths)]
        views = np.stack([load_view(f, loaded.img_size) for f in files])
        grades[enc] = predict_views(loaded, views).argmax(axis=1)
    assert np.array_equal(grades["bit16"], grades["orig"])
    assert np.array_equal(grades["rgb"], grades["orig"])


def test_unknown_shift_is_a_user_error(tiny_run, synth_png, capsys):
    assert main(["robustness", "--run", str(tiny_run), "--data", str(synth_png), "--shifts", "sepia"]) == 1
    assert "unknown shift" in capsys.readouterr().err
