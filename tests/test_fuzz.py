"""Fuzz suite (hypothesis): hostile images, DICOMs, manifests and config files into every entry point.

Property everywhere: a result or one clear error (a klgrade error class / exit 1 / HTTP 4xx), never
another exception, a 500 or a lost batch. The CI profile keeps it to a few seconds a test; set
KLGRADE_FUZZ_PROFILE=deep for thousands of examples (benchmarks/fuzz_deep.py runs a seeded version).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_util import CONFIG_TEXTS, HypChooser, hostile_file, manifest_text
from klgrade.cli import main

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=list(HealthCheck))
settings.register_profile("klgrade-ci", max_examples=15, derandomize=True, **_COMMON)
settings.register_profile("klgrade-deep", max_examples=600, **_COMMON)
PROFILE = settings.get_profile(f"klgrade-{os.environ.get('KLGRADE_FUZZ_PROFILE', 'ci')}")


def _scaled(n: int):
    """The profile with ``n`` x its examples (cheap properties get more, costly ones fewer)."""
    return settings(PROFILE, max_examples=max(3, int(PROFILE.max_examples * n)))


CLEAR = (ValueError, FileNotFoundError)  # ImageReadError, DicomError, ClinicError, RunError, ManifestError


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(work: Path, data: bytes, suffix: str, name: str = "case") -> Path:
    p = work / f"{name}{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture(scope="module")
def grader(tiny_cnn_run):
    from klgrade.clinic.grader import Grader

    return Grader.from_run(tiny_cnn_run)


@pytest.fixture(scope="module")
def good(synth_png) -> list[str]:
    df = pd.read_csv(synth_png / "manifest.csv", dtype=str)
    return [str(synth_png / p) for p in df["path"].head(6)]


# ---------------------------------------------------------------------- images and DICOMs

@_scaled(4)
@given(data=st.data())
def test_read_image_gives_a_usable_array_or_a_clear_error(work, data):
    from klgrade.ingest.images import read_image

    raw, suffix, _ = hostile_file(HypChooser(data))
    path = _write(work, raw, suffix)
    try:
        img = read_image(path)
    except CLEAR as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert img.ndim == 2 and img.dtype.name == "float32" and min(img.shape) >= 16
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


@_scaled(2)
@given(data=st.data())
def test_grader_grades_or_names_the_reason(grader, work, data):
    from klgrade.clinic.grader import ClinicError

    raw, suffix, _ = hostile_file(HypChooser(data))
    path = _write(work, raw, suffix)
    try:
        res = grader.predict_file(path, heatmaps=True, display="upload")
    except ClinicError as e:
        assert str(e).startswith("upload") and "\n" not in str(e)
        return
    assert res["knees"] and all(k.get("klg") in (0, 1, 2, 3, 4) or k.get("error") for k in res["knees"])


_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str))
_CHUNK = st.one_of(st.none(), _NUMBERS, st.text(max_size=40),
                   st.tuples(_NUMBERS, _NUMBERS).map(",".join), st.lists(_NUMBERS, max_size=4).map(",".join))


@_scaled(3)
@given(spacing=_CHUNK, joint=_CHUNK)
def test_a_crops_stated_spacing_and_joint_give_a_view_or_a_clear_error(work, spacing, joint):
    """Prepared crops state their spacing and joint centre in PNG text (issue 15): whatever text a
    file carries there, the view is made (from a valid statement) or refused in one line naming the file."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    from klgrade.ingest.images import JOINT_KEY, SPACING_KEY
    from klgrade.view.entrance import ViewError, film_knees

    info = PngImagePlugin.PngInfo()
    for key, value in ((SPACING_KEY, spacing), (JOINT_KEY, joint)):
        if value is not None:
            info.add_itxt(key, value)
    path = work / "chunk.png"
    ramp = (np.linspace(0, 60000, 96 * 96).reshape(96, 96)).astype(np.uint16)
    Image.fromarray(ramp).save(path, pnginfo=info)
    try:
        _, knees = film_knees(path, 64)
    except ViewError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert knees[0].view.shape == (64, 64)


@pytest.fixture(scope="module")
def client(grader):
    from fastapi.testclient import TestClient

    from klgrade.clinic.serve import create_app

    # raise_server_exceptions (the default): an unhandled error fails the test instead of a 500
    with TestClient(create_app(grader=grader, max_upload_mb=2), base_url="http://localhost") as c:
        yield c


@_scaled(2)
@given(data=st.data())
def test_serve_answers_200_or_4xx_never_500(client, data):
    raw, suffix, _ = hostile_file(HypChooser(data))
    r = client.post("/predict", files={"file": (f"x{suffix}", raw)}, params={"heatmaps": "false"})
    assert r.status_code in (200, 400, 413), r.text
    assert "Traceback" not in r.text and ("knees" in r.json() if r.status_code == 200 else r.json()["detail"])


@_scaled(0.5)
@given(data=st.data())
def test_predict_batch_loses_no_file(tiny_cnn_run, good, work, data, capsys):
    c = HypChooser(data)
    bad = [_write(work, *hostile_file(c)[:2], name=f"b{i}") for i in range(3)]
    files = [good[0], *map(str, bad), good[1]]
    rc = main(["predict", *files, "--run", str(tiny_cnn_run), "--json"])
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert rc in (0, 1) and "Traceback" not in err
    assert sorted([r["file"] for r in res["results"]] + [e["file"] for e in res["errors"]]) == sorted(files)
    assert {good[0], good[1]} <= {r["file"] for r in res["results"]}
    assert len(err.strip().splitlines()) == len(res["errors"])  # one line per refused file


@_scaled(0.5)
@given(data=st.data())
def test_measure_lists_every_file(good, work, data, capsys):
    """`klgrade measure` over a folder with hostile files: every file is measured (a row per knee,
    with a reason when it could not be) or a reject with a reason; the batch goes on."""
    c = HypChooser(data)
    root, out = work / "to_measure", work / "jsw"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    root.mkdir()
    for i, g in enumerate(good[:2]):
        shutil.copy(g, root / f"g{i}.png")
    for i in range(3):
        raw, suffix, _ = hostile_file(c)
        _write(root, raw, suffix if suffix in (".png", ".jpg", ".dcm") else ".dcm", f"h{i}")
    assert main(["measure", "--data", str(root), "--out", str(out), "--sheet", "4"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = pd.read_csv(out / "jsw.csv", dtype={"image_id": str})
    rejects = pd.read_csv(out / "rejects.csv")
    measured = {i.rsplit("_", 1)[0] if i.endswith(("_R", "_L")) else i for i in rows["image_id"]}
    rejected = {Path(p).stem for p in rejects["path"]}
    assert measured | rejected == {p.stem for p in root.iterdir()} and not measured & rejected
    assert {"g0", "g1"} <= measured
    assert rows.loc[~rows["ok"].astype(bool), "reason"].fillna("").str.len().gt(0).all()


# ---------------------------------------------------------------------- batch ingest

@_scaled(0.5)
@given(data=st.data())
def test_prepare_folders_lists_every_file(good, work, data, capsys):
    c = HypChooser(data)
    root, out = work / "tree", work / "ds"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    (root / "train" / "1").mkdir(parents=True)
    for i, g in enumerate(good[:3]):
        shutil.copy(g, root / "train" / "1" / f"g{i}.png")
    for i in range(4):
        raw, suffix, _ = hostile_file(c)
        _write(root / "train" / str(c.int(0, 5)), raw, suffix or ".dcm", f"h{i}")
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert main(["prepare", "folders", str(root), "--out", str(out), "--workers", "1"]) == 0
    listed = len(pd.read_csv(out / "manifest.csv")) + len(pd.read_csv(out / "rejects.csv"))
    assert listed == n_files  # every file is in the dataset or a reject with a reason
    assert "Traceback" not in capsys.readouterr().err


@_scaled(1)
@given(data=st.data())
def test_prepare_csv_takes_or_rejects_every_row(good, work, data, capsys):
    c = HypChooser(data)
    table, out = work / "table.csv", work / "ds_csv"
    shutil.rmtree(out, ignore_errors=True)
    table.write_bytes(manifest_text(c, good[:4]).encode("utf-8", "surrogateescape"))
    rc = main(["prepare", "csv", str(table), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "Traceback" not in err
    if rc == 1:
        assert len(err.strip().splitlines()) == 1
    else:
        rows = len(pd.read_csv(table, dtype=str, keep_default_na=False))
        assert len(pd.read_csv(out / "manifest.csv")) + len(pd.read_csv(out / "rejects.csv")) == rows


@_scaled(1)
@given(data=st.data())
def test_oai_film_is_cropped_or_rejected_never_raises(work, data):
    from hostile_util import dicom_bytes
    from klgrade.ingest.oai import CropParams, process_series
    from klgrade.ingest.oai_series import series_from_headers

    c = HypChooser(data)
    raw = dicom_bytes(c)
    if c.int(0, 2) == 0:
        raw = raw[: c.int(1, len(raw))]
    tree = work / "oai"
    shutil.rmtree(tree, ignore_errors=True)
    path = _write(tree / "12m" / "1.C.2" / "9000001" / "20050101" / "01000001", raw, "", "001")
    found, rejects, _ = series_from_headers(tree, progress=False)
    assert len(found) + len(rejects) <= 1 and all(r["reason"] for r in rejects)
    rec = process_series({"path": str(path), "rel": "x", "patient_id": "9000001", "visit": 12,
                          "sides": ["R", "L"], "out": str(work / "oai_out"),
                          "params": CropParams(size=32, mm_per_px=2.0).__dict__})
    assert all(("crop" in s) != ("reject" in s) for s in rec["sides"].values())


# ---------------------------------------------------------------------- manifests and configs

@_scaled(0.5)
@given(data=st.data())
def test_evaluate_fuzzed_manifest_is_a_result_or_one_line(tiny_cnn_run, good, work, data, capsys):
    c = HypChooser(data)
    ds, out = work / "ev_data", work / "ev_out"
    shutil.rmtree(out, ignore_errors=True)
    ds.mkdir(exist_ok=True)
    (ds / "manifest.csv").write_bytes(manifest_text(c, good).encode("utf-8", "surrogateescape"))
    rc = main(["evaluate", "--run", str(tiny_cnn_run), "--data", str(ds), "--split", c.choice(("all", "test")),
               "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 1:
        assert len([ln for ln in err.splitlines() if ln.startswith("klgrade")]) == 1
    else:
        assert rc == 0 and (out / "metrics_all.json").exists() or (out / "metrics_test.json").exists()


@_scaled(1)
@given(text=st.one_of(st.sampled_from(CONFIG_TEXTS), st.text(max_size=80)))
def test_read_config_is_a_mapping_or_a_run_error(work, text):
    from klgrade.rundir import RunError, read_config

    run = work / "cfg_run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        cfg = read_config(run)
    except RunError as e:
        assert "config.yaml" in str(e) and "\n" not in str(e)
        return
    assert isinstance(cfg, dict)
