"""Regression tests of issue 18: one per numbered hostile input. Each ends in a result or one clear
line naming the file and the reason (exit 1 / HTTP 4xx), never a traceback, a lost batch or a
silent overwrite."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hostile_util import RandChooser, config_text, dicom_bytes, knee_like, png_header_only
from klgrade.cli import main
from klgrade.ingest.images import ImageReadError, read_image

BOMB = png_header_only(60000, 60000)


def _good_png(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((knee_like(size, size) * 255).astype(np.uint8)).save(path)
    return path


def _tiny_dicom(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(RandChooser(0), rows=n, cols=n, good=True))
    return path


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("klgrade")]
    assert "Traceback" not in err and lines, err
    return lines[-1]


@pytest.fixture(scope="module")
def client(tiny_cnn_run):
    from fastapi.testclient import TestClient

    from klgrade.clinic.grader import Grader
    from klgrade.clinic.serve import create_app

    with TestClient(create_app(grader=Grader.from_run(tiny_cnn_run), max_upload_mb=4),
                    base_url="http://localhost") as c:
        yield c


# 1 ------------------------------------------------------------------ decompression bomb header
def test_01_bomb_png_refused_before_decoding_everywhere(tiny_cnn_run, client, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(BOMB)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(bomb)
    good = _good_png(tmp_path / "good.png")
    assert main(["predict", str(good), str(bomb), str(good), "--run", str(tiny_cnn_run), "--json"]) == 1
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert [r["file"] for r in res["results"]] == [str(good), str(good)]  # the batch survives
    assert "bomb.png: image too large" in _one_line(err)
    r = client.post("/predict", files={"file": ("x.png", BOMB)})
    assert r.status_code == 400 and "too large" in r.json()["detail"]


def test_01_bomb_png_in_prepare_folders_and_csv_is_a_reject(tmp_path, capsys):
    root = tmp_path / "tree"
    for i in range(4):
        _good_png(root / "train" / "1" / f"k{i}.png")
    (root / "train" / "1" / "bomb.png").write_bytes(BOMB)
    assert main(["prepare", "folders", str(root), "--out", str(tmp_path / "ds")]) == 0
    rejects = pd.read_csv(tmp_path / "ds" / "rejects.csv")
    assert rejects["path"].str.endswith("bomb.png").any() and rejects["reason"].str.contains("too large").any()
    table = tmp_path / "t.csv"
    table.write_text("path,klg\n" + "".join(f"tree/train/1/k{i}.png,1\n" for i in range(4)) + "tree/train/1/bomb.png,2\n")
    assert main(["prepare", "csv", str(table), "--out", str(tmp_path / "ds2")]) == 0
    assert "too large" in (tmp_path / "ds2" / "rejects.csv").read_text()


# 2 ------------------------------------------------------------------ tiny DICOM
@pytest.mark.parametrize("n", [1, 8])
def test_02_tiny_dicom_has_the_png_reason_everywhere(n, tiny_cnn_run, client, tmp_path, capsys):
    dcm = _tiny_dicom(tmp_path / "tiny.dcm", n)
    png = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((n, n), np.uint8)).save(png)
    for p in (dcm, png):
        with pytest.raises(ValueError, match=f"image too small \\({n}x{n} px"):
            read_image(p)
    assert main(["predict", str(dcm), "--run", str(tiny_cnn_run)]) == 1
    assert "image too small" in _one_line(capsys.readouterr().err)
    r = client.post("/predict", files={"file": ("x.dcm", dcm.read_bytes())})
    assert r.status_code == 400 and "image too small" in r.json()["detail"]
    root = tmp_path / "tree"
    for i in range(3):
        _good_png(root / "2" / f"k{i}.png")
    shutil.copy(dcm, root / "2" / "tiny.dcm")
    shutil.copy(png, root / "2" / "tiny.png")
    assert main(["prepare", "folders", str(root), "--out", str(tmp_path / "ds")]) == 0
    reasons = pd.read_csv(tmp_path / "ds" / "rejects.csv")["reason"].tolist()
    assert len(reasons) == 2 and all(r.startswith(f"image too small ({n}x{n} px") for r in reasons)


def test_02_tiny_or_odd_film_never_stops_the_oai_ingest(tmp_path):
    from klgrade.ingest.oai import CropParams, process_series

    for n in (1, 8, 16, 40):
        path = _tiny_dicom(tmp_path / f"f{n}" / "001", n)
        rec = process_series({"path": str(path), "rel": f"f{n}/001", "patient_id": "9000001", "visit": 12,
                              "sides": ["R", "L"], "out": str(tmp_path / "out"),
                              "params": CropParams().__dict__})
        assert set(rec["sides"]) == {"R", "L"}
        for side in rec["sides"].values():
            assert "reject" in side and side["reject"]  # a reason, not an exception
    assert "image too small (1x1 px" in process_series({
        "path": str(tmp_path / "f1" / "001"), "rel": "x", "patient_id": "9000001", "visit": 12, "sides": ["R"],
        "out": str(tmp_path / "out"), "params": CropParams().__dict__})["sides"]["R"]["reject"]


# 3 ------------------------------------------------------------------ file name not UTF-8
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_03_non_utf8_file_name_is_a_reject_not_a_lost_batch(tmp_path):
    root = tmp_path / "tree"
    for i in range(3):
        _good_png(root / "1" / f"k{i}.png")
    bad = os.fsencode(root / "1") + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write((root / "1" / "k0.png").read_bytes())
    assert main(["prepare", "folders", str(root), "--out", str(tmp_path / "ds")]) == 0
    assert len(pd.read_csv(tmp_path / "ds" / "manifest.csv")) == 3
    rejects = (tmp_path / "ds" / "rejects.csv").read_text(encoding="utf-8")
    assert "caf\\xe9.png" in rejects and "not valid UTF-8" in rejects


# 4, 5 --------------------------------------------------------------- manifests evaluate/train cannot use
def _dataset(tmp_path: Path, synth_png: Path, n: int = 12) -> Path:
    df = pd.read_csv(synth_png / "manifest.csv", dtype=str, keep_default_na=False).head(n)
    df["path"] = [str(synth_png / p) for p in df["path"]]
    df["split"] = "test"
    out = tmp_path / "data"
    out.mkdir()
    df.to_csv(out / "manifest.csv", index=False)
    return out


def test_04_corrupt_image_in_manifest_is_one_line_in_evaluate_and_train(tiny_cnn_run, synth_png, tmp_path, capsys):
    data = _dataset(tmp_path, synth_png)
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    df.loc[3, "path"] = str(bad)
    df.to_csv(data / "manifest.csv", index=False)
    assert main(["evaluate", "--run", str(tiny_cnn_run), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "1 of 12 image(s) cannot be read" in line and "corrupt.png: not a readable image" in line
    assert not (tmp_path / "ev" / "predictions_test.csv").exists()
    df["split"] = ["train"] * 8 + ["val"] * 4
    df.to_csv(data / "manifest.csv", index=False)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "test_resnet",
                 "--weights", "none", "--img-size", "32", "--epochs", "1", "--device", "cpu"]) == 1
    assert "corrupt.png" in _one_line(capsys.readouterr().err)


def test_05_manifest_without_rows_is_one_line(tiny_cnn_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.csv").write_text("image_id,path,patient_id,visit,side,klg,split,source\n")
    assert main(["evaluate", "--run", str(tiny_cnn_run), "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 1
    assert "no images listed" in _one_line(capsys.readouterr().err)


# 6 ------------------------------------------------------------------ malformed config.yaml
@pytest.mark.parametrize("text", ["kind: cnn\nmodel: [unclosed\n", "!!python/object/apply:os.system ['true']\n",
                                  "- kind: cnn\n- model: x\n"], ids=["syntax", "unsafe-tag", "list"])
def test_06_malformed_config_is_one_line_in_every_command(text, tiny_cnn_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_cnn_run, run)
    (run / "config.yaml").write_text(text)
    img = _good_png(tmp_path / "k.png")
    for argv in (["evaluate", "--run", str(run), "--data", str(tiny_cnn_run), "--out", str(tmp_path / "e")],
                 ["predict", str(img), "--run", str(run)],
                 ["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
                 ["serve", "--run", str(run)]):
        assert main(argv) == 1, argv
        line = _one_line(capsys.readouterr().err)
        assert "config.yaml" in line and ("not valid YAML" in line or "expected a mapping" in line), line


# 7, 8 --------------------------------------------------------------- no silent overwrite
def test_07_evaluate_never_replaces_a_runs_predictions_with_another_datasets(tiny_cnn_run, synth_png, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_cnn_run, run)
    before = (run / "predictions_test.csv").read_bytes()
    other = _dataset(tmp_path, synth_png)
    assert main(["evaluate", "--run", str(run), "--data", str(other), "--split", "test", "--device", "cpu"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "--out" in line and "--overwrite" in line
    assert (run / "predictions_test.csv").read_bytes() == before
    out = tmp_path / "ev"
    argv = ["evaluate", "--run", str(run), "--data", str(other), "--split", "test", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0 and (out / "predictions_test.csv").is_file()
    assert main(argv) == 1 and "--overwrite" in _one_line(capsys.readouterr().err)
    assert main(argv + ["--overwrite"]) == 0
    # the run's own re-evaluation on its own data still refreshes its own files
    assert main(["evaluate", "--run", str(run), "--split", "test", "--device", "cpu"]) == 0


def test_08_prepare_never_replaces_a_dataset(tmp_path, capsys):
    root = tmp_path / "tree"
    for i in range(4):
        _good_png(root / "1" / f"k{i}.png")
    out = tmp_path / "ds"
    assert main(["prepare", "folders", str(root), "--out", str(out)]) == 0
    before = (out / "manifest.csv").read_bytes()
    table = tmp_path / "t.csv"
    table.write_text("path,klg\ntree/1/k0.png,1\n")
    for argv in (["prepare", "folders", str(root), "--out", str(out)], ["prepare", "csv", str(table), "--out", str(out)]):
        assert main(argv) == 1
        assert "already holds a dataset" in _one_line(capsys.readouterr().err)
        assert (out / "manifest.csv").read_bytes() == before
    assert main(["prepare", "csv", str(table), "--out", str(out), "--overwrite"]) == 0
    assert len(pd.read_csv(out / "manifest.csv")) == 1


# 9 ------------------------------------------------------------------ pixel budget
def test_09_over_budget_image_is_refused_from_its_header(tiny_cnn_run, client, tmp_path, monkeypatch):
    big = tmp_path / "big16.png"
    big.write_bytes(png_header_only(9400, 9400, bit_depth=16))
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="88 MP; the pixel budget is 50 MP"):
        read_image(big)
    assert time.perf_counter() - t0 < 1.0  # nothing decoded
    r = client.post("/predict", files={"file": ("x.png", big.read_bytes())})
    assert r.status_code == 400 and "pixel budget" in r.json()["detail"]
    monkeypatch.setenv("KLGRADE_MAX_PIXELS", "1000")  # configurable, for DICOM from Rows x Columns too
    dcm = tmp_path / "d.dcm"
    dcm.write_bytes(dicom_bytes(RandChooser(0), rows=40, cols=40, good=True))
    with pytest.raises(ValueError, match="pixel budget is 0.001 MP"):
        read_image(dcm)


# 10 ----------------------------------------------------------------- temp files of killed processes
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_10_scratch_files_of_killed_processes_are_swept(tiny_cnn_run, synth_png, tmp_path):
    from klgrade import io
    from klgrade.clinic.serve import create_app
    from klgrade.view.cache import cached_views

    dead = io.scratch_prefix("views").replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    stale = tmp_path / f"{dead}views_64px_x.tmp"
    stale.write_bytes(b"0" * 100)
    mine = tmp_path / f"{io.scratch_prefix('views')}views_64px_y.tmp"  # a live build: kept
    mine.write_bytes(b"0")
    cached_views([_good_png(tmp_path / "k.png")], 32, cache_dir=tmp_path, progress=False)
    assert not stale.exists() and mine.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p != mine]
    import tempfile

    dead = io.scratch_prefix("upload").replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    upload = Path(tempfile.gettempdir()) / f"{dead}x"
    upload.mkdir()
    (upload / "upload").write_bytes(b"patient data")
    create_app(tiny_cnn_run)
    assert not upload.exists()


# 11 ----------------------------------------------------------------- silent skips
def test_11_links_and_stray_files_are_listed_by_prepare_folders(tmp_path):
    root = tmp_path / "tree"
    for i in range(3):
        _good_png(root / "0" / f"k{i}.png")
    (root / "README.txt").write_text("notes")
    (root / "0" / "loop.png").symlink_to(root / "0" / "loop.png")
    (root / "0" / "gone.png").symlink_to(root / "0" / "missing.png")
    assert main(["prepare", "folders", str(root), "--out", str(tmp_path / "ds")]) == 0
    reasons = dict(pd.read_csv(tmp_path / "ds" / "rejects.csv").pipe(lambda d: zip(d["path"].map(lambda p: Path(p).name), d["reason"])))
    assert reasons["loop.png"] == "symbolic link loop"
    assert reasons["gone.png"].startswith("broken symbolic link")
    assert "not an image file" in reasons["README.txt"]


def test_11_truncated_dicom_and_link_loop_are_oai_rejects(tmp_path):
    from klgrade.ingest.oai import series_from_headers

    series = tmp_path / "12m" / "1.C.2" / "9000001" / "20050101"
    good = dicom_bytes(RandChooser(1), rows=40, cols=40, good=True)
    for i, data in enumerate([good, good[:600], good[:200]]):
        (series / f"0{i}").mkdir(parents=True)
        (series / f"0{i}" / "001").write_bytes(data)
    (series / "03").mkdir()
    (series / "03" / "001").symlink_to(series / "03" / "001")
    found, rejects, counts = series_from_headers(tmp_path, progress=False)
    assert len(found) == 1 and counts["other_series"] == 0
    reasons = {Path(r["path"]).parent.name: r["reason"] for r in rejects}
    assert reasons["03"] == "symbolic link loop"
    assert "cut short" in reasons["01"] and "cut short" in reasons["02"]


# 12 ----------------------------------------------------------------- Host header (DNS rebinding)
def test_12_serve_answers_only_allowed_hosts(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/healthz", headers={"host": "127.0.0.1:8000"}).status_code == 200


# issue 15 ------------------------------------------------------------ a broken head run: one line
def test_evaluate_of_a_head_run_without_checkpoint_says_so(tmp_path, capsys):
    run = tmp_path / "head"
    run.mkdir()
    (run / "config.yaml").write_text(f"kind: head\ndata: {tmp_path}\n")
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "o"), "--tta", "flip"]) == 1
    assert "no checkpoint.pt" in _one_line(capsys.readouterr().err)


def test_rejects_with_any_path_are_written(tmp_path):
    from klgrade.ingest.manifest import write_rejects

    write_rejects([{"path": "caf\udce9.png", "reason": "x"}, {"path": "ok.png", "reason": "y"}], tmp_path)
    assert "caf\\xe9.png" in (tmp_path / "rejects.csv").read_text(encoding="utf-8")


def test_config_texts_never_escape_read_config(tmp_path):
    from klgrade.rundir import RunError, read_config

    for i in range(10):
        (tmp_path / "config.yaml").write_text(config_text(RandChooser(i)), encoding="utf-8")
        with pytest.raises(RunError, match="config.yaml"):
            read_config(tmp_path)
