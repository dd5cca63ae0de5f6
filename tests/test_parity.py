"""Issue 15: for the same files, `klgrade predict` gives the probabilities `klgrade evaluate` gives.

Both entrances must make the same view (klgrade.view.canonical.canonical_view) and run the model in
the same layout (the precision/memory format load_cnn_run picked): <= 1e-5 apart in fp32, <= 5e-3
(bf16 rounding; evaluate batches, predict grades one file at a time) where the run uses bf16.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from klgrade.cli import main
from klgrade.clinic.grader import Grader

PROBS = [f"p{g}" for g in range(5)]


def _tolerance(grader: Grader) -> float:
    return 1e-5 if grader.amp_dtype is None else 5e-3


def _predicted(capsys, files, run) -> dict[str, np.ndarray]:
    """{file: (5,) probabilities} from the `predict` command (one knee per PNG crop)."""
    assert main(["predict", *map(str, files), "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == []
    return {r["file"]: np.array(r["knees"][0]["probabilities"]) for r in out["results"]}


def _evaluated(capsys, run, data, out) -> pd.DataFrame:
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    capsys.readouterr()
    return pd.read_csv(out / "predictions_test.csv")


def _files(data, ev: pd.DataFrame) -> list[str]:
    from klgrade.ingest.manifest import image_paths, read_manifest

    df = read_manifest(data).set_index("image_id").loc[ev["image_id"]]
    return [str(p) for p in image_paths(df.reset_index())]


def test_cnn_run_predict_equals_evaluate_on_png_crops(tiny_cnn_run, synth_png, tmp_path, capsys):
    ev = _evaluated(capsys, tiny_cnn_run, synth_png, tmp_path / "eval").head(12)
    files = _files(synth_png, ev)
    pred = _predicted(capsys, files, tiny_cnn_run)
    grader = Grader.from_run(tiny_cnn_run)
    assert grader.precision == ("bfloat16 + channels-last" if grader.amp_dtype is not None else "float32")
    diff = np.abs(np.stack([pred[f] for f in files]) - ev[PROBS].to_numpy())
    assert diff.max() <= _tolerance(grader), (diff.max(), grader.precision)


def test_predict_uses_the_layout_evaluate_uses(tiny_cnn_run):
    """The root cause of the 2e-3 drift: predict ran fp32 while evaluate ran the run's bf16 layout."""
    from klgrade.runs.cnn import load_cnn_run

    loaded, grader = load_cnn_run(tiny_cnn_run, device="cpu"), Grader.from_run(tiny_cnn_run)
    assert (grader.amp_dtype, grader.channels_last) == (loaded.amp_dtype, loaded.channels_last)


@pytest.fixture(scope="module")
def head_run(tiny_biomedclip, synth_png, tmp_path_factory):
    from klgrade.embed.store import embed_dataset
    from klgrade.heads import HeadConfig, fit_head

    root = tmp_path_factory.mktemp("parity_head")
    embed_dataset(synth_png, "biomedclip", root / "store", weights=str(tiny_biomedclip), device="cpu",
                  progress=False)
    fit_head(root / "store", synth_png, root / "head_run", HeadConfig(head="mlp", epochs=2))
    return root / "head_run"


@pytest.fixture(scope="module")
def film_manifest(bilateral_dicom, tmp_path_factory):
    """A dataset whose two rows are the two knees of one bilateral DICOM film (side R and L)."""
    path, truth = bilateral_dicom
    d = tmp_path_factory.mktemp("film_ds")
    pd.DataFrame({"image_id": ["filmR", "filmL"], "path": [str(path)] * 2, "patient_id": ["p1", "p1"],
                  "visit": ["", ""], "side": ["R", "L"], "klg": [truth["klg"]["R"], truth["klg"]["L"]],
                  "split": ["test", "test"], "source": ["synth", "synth"]}).to_csv(d / "manifest.csv", index=False)
    return d


def test_head_run_predict_equals_evaluate_on_png_crops(head_run, synth_png, tmp_path, capsys):
    run = head_run
    ev = _evaluated(capsys, run, synth_png, tmp_path / "eval").head(12)
    files = _files(synth_png, ev)
    pred = _predicted(capsys, files, run)
    grader = Grader.from_run(run)
    assert grader.kind == "head" and grader.amp_dtype is None  # frozen embedders run fp32 both ways
    diff = np.abs(np.stack([pred[f] for f in files]) - ev[PROBS].to_numpy())
    assert diff.max() <= 1e-5, diff.max()


def test_bilateral_dicom_predict_equals_evaluate_of_its_prepared_crops(synth_dicom, tmp_path):
    """`prepare oai` on a synthetic tree, then each knee of a film: predict on the film vs the view
    evaluate makes of that knee's crop. Compared as views (the model only sees the view). One
    locator, on the same reduced film, cuts the crop and frames predict's view; the crop states
    its spacing and joint centre (PNG text chunks), so evaluate frames it on them. They differed
    by 17-21 grey levels when the crop was framed by anatomy; what is left (0.6-0.9) is the crop's
    own resampling (cut at 0.35 mm/px, then viewed)."""
    import glob

    from klgrade.clinic.grader import knees_from_file
    from klgrade.ingest.oai import prepare_oai
    from klgrade.view.entrance import view_file

    ds = tmp_path / "ds"
    prepare_oai(synth_dicom, sorted(glob.glob(str(synth_dicom / "kxr_sq_bu*.txt"))), ds, progress=False)
    df = pd.read_csv(ds / "manifest.csv")
    film, rows = next(iter(df.groupby("dicom")))
    _, knees = knees_from_file(synth_dicom / film, 64, jsw=False)
    for k in knees:
        row = rows[rows.side == k.side]
        if len(row):
            view, info = view_file(ds / row.path.iloc[0], 64)
            assert info.scale_source == "spacing" == k.info.scale_source
            assert np.abs(view.astype(float) - k.view).mean() < 1.0  # of 255


@pytest.mark.parametrize("kind", ["cnn", "head"])
def test_bilateral_dicom_predict_equals_evaluate_of_the_same_film(kind, tiny_cnn_run, head_run, film_manifest,
                                                                   bilateral_dicom, tmp_path, capsys):
    """The same film through both entrances: predict on the file, evaluate on a manifest whose rows
    name its right and left knee. One view entrance (klgrade.view.entrance), one Predictor."""
    run = tiny_cnn_run if kind == "cnn" else head_run
    ev = _evaluated(capsys, run, film_manifest, tmp_path / "eval").set_index("image_id")
    assert main(["predict", str(bilateral_dicom[0]), "--run", str(run), "--json", "--no-jsw"]) == 0
    knees = {k["side"]: np.array(k["probabilities"]) for k in json.loads(capsys.readouterr().out)["results"][0]["knees"]}
    assert set(knees) == {"R", "L"}
    tol = _tolerance(Grader.from_run(run))
    for side in "RL":
        assert np.abs(knees[side] - ev.loc[f"film{side}", PROBS].to_numpy(float)).max() <= tol


def test_evaluate_honours_tta_for_head_runs(head_run, synth_png, tmp_path, capsys):
    """--tta flip on a head run averages each view with its mirror (it was refused before)."""
    from klgrade.ingest.manifest import image_paths, read_manifest, select_split
    from klgrade.runs import load_run
    from klgrade.view.entrance import load_view

    assert main(["evaluate", "--run", str(head_run), "--data", str(synth_png), "--split", "test", "--tta", "flip",
                 "--batch-size", "7", "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    ev = pd.read_csv(tmp_path / "ev" / "predictions_test.csv").head(6)
    df = select_split(read_manifest(synth_png), "test").head(6)
    pred = load_run(head_run, device="cpu")
    views = np.stack([load_view(p, pred.img_size) for p in image_paths(df)])
    want = (pred.predict_views(views, tta="none") + pred.predict_views(views[:, :, ::-1].copy(), tta="none")) / 2
    np.testing.assert_allclose(ev[PROBS].to_numpy(), want, atol=1e-5)
    assert json.loads((tmp_path / "ev" / "metrics_test.json").read_text())["tta"] == "flip"


def test_a_pretrain_run_is_not_a_grader(tmp_path):
    from klgrade.rundir import RunError
    from klgrade.runs import load_run

    (tmp_path / "config.yaml").write_text("kind: pretrain\n")
    with pytest.raises(RunError, match="fine-tune it"):
        load_run(tmp_path)
