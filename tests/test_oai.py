"""OAI ingest: label tables, tree scan, and `klgrade prepare oai` end to end on a synthetic tree."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_util import jpeg_lossless
from klgrade.cli import main
from klgrade.ingest import oai
from klgrade.ingest.manifest import read_manifest
from klgrade.synthetic import write_dicom_tree

# ----------------------------------------------------------------------------- label tables

TXT = """ID|SIDE|READPRJ|VERSION|V01XRKL|V01XRJSM|V01XRJSL|V01XROSFM|V01XRSCFM|V01XRATTM|V01XRCHM
9000099|1: Right|15|2.3.2|2: 2|1: 1|0: 0|1: 1|0: 0|0: 0|0: 0
9000099|2: Left|15|2.3.2|.T: Total knee replacement|.T|.T|.T|.T|.T|.T
9000100|1: Right|37|9.9|3: 3|2: 2|0: 0|1: 1|0: 0|0: 0|0: 0
9000100|1: Right|15|1.2.9|4: 4|2: 2|0: 0|1: 1|0: 0|0: 0|0: 0
9000100|1: Right|15|1.2.10|1: 1|2: 2|0: 0|1: 1|0: 0|0: 0|0: 0
9000100|2: Left|15|1.2|.M|.M|.M|.M|.M|.M|.M
9000101|2: Left|15|1.2|0: 0|0.5|0: 0|0: 0|0: 0|0: 0|0: 0
9000102|3: Both|15|1.2|0: 0|0: 0|0: 0|0: 0|0: 0|0: 0|0: 0
9000103|1: Right|15|1.2|7: 7|0: 0|0: 0|0: 0|0: 0|0: 0|0: 0
"""


def test_label_table_txt(tmp_path):
    p = tmp_path / "kxr_sq_bu01.txt"
    p.write_text(TXT)
    lab = oai.read_labels([p])
    t = lab.table.set_index(["patient_id", "side"])
    assert set(t.index) == {("9000099", "R"), ("9000100", "R"), ("9000101", "L")}
    assert (lab.table["visit"] == 12).all()
    assert t.loc[("9000099", "R"), "klg"] == 2 and t.loc[("9000099", "R"), "jsn_medial"] == 1.0
    assert t.loc[("9000101", "L"), "jsn_medial"] == 0.5  # plain numbers are kept
    assert "xr_chm" in lab.table.columns  # unlisted XR features survive under a generic name
    # duplicates: READPRJ 15 beats 37 even at a higher VERSION; then 1.2.10 > 1.2.9 numerically
    assert t.loc[("9000100", "R"), "klg"] == 1 and t.loc[("9000100", "R"), "version"] == "1.2.10"
    assert lab.duplicates == 2
    reasons = dict(zip(zip(lab.dropped["patient_id"], lab.dropped["side"]), lab.dropped["reason"]))
    assert reasons[("9000099", "L")] == "no KL grade (missing code .T)"
    assert reasons[("9000100", "L")] == "no KL grade (missing code .M)"
    assert "KL grade 7 is not 0-4" in reasons[("9000103", "R")]
    assert "SIDE" in reasons[("9000102", "")]
    # visit filter
    assert oai.read_labels([p], visits=[24]).table.empty


def test_label_table_sas_transport_and_errors(tmp_path):
    pyreadstat = pytest.importorskip("pyreadstat")
    df = pd.DataFrame({"ID": ["9000099", "9000099", "9000100"], "SIDE": [1.0, 2.0, 1.0],
                       "READPRJ": [15.0, 15.0, 15.0], "VERSION": ["1", "1", "1"],
                       "V03XRKL": [2.0, np.nan, 3.0], "V03XRJSM": [1.0, np.nan, 2.0]})
    p = tmp_path / "kxr_sq_bu03.xpt"
    pyreadstat.write_xport(df, str(p), file_format_version=8)
    lab = oai.read_labels(p)
    assert lab.table[["patient_id", "visit", "side", "klg"]].values.tolist() == [
        ["9000099", 24, "R", 2], ["9000100", 24, "R", 3]]
    assert lab.dropped["reason"].tolist() == ["no KL grade (empty)"]  # SAS missing → NaN
    bad = tmp_path / "bad.txt"
    bad.write_text("ID|SIDE|V01XRJSM\n1|1|1\n")
    with pytest.raises(oai.LabelError, match="bad.txt: no VVVXRKL column"):
        oai.read_labels([bad])
    bad.write_text("ID|SIDE|V02XRKL\n1|1|1\n")
    with pytest.raises(oai.LabelError, match="unknown visit code"):
        oai.read_labels([bad])
    with pytest.raises(FileNotFoundError):
        oai.read_labels([tmp_path / "absent.txt"])


def test_parse_codes_and_paths():
    assert oai.parse_code("2: 2") == 2.0 and np.isnan(oai.parse_code(".M: Missing Form"))
    assert oai.parse_side("1: Right") == "R" and oai.parse_side(2.0) == "L" and oai.parse_side("3") is None
    assert oai.VISIT_MONTHS == {"V00": 0, "V01": 12, "V03": 24, "V05": 36, "V06": 48, "V08": 72, "V10": 96}
    assert oai.parse_oai_path("12m/1.E.1/9000099/20060713/01653203/001") == ("9000099", 12)
    assert oai.parse_oai_path("x/8.C.2/9000099/20100713/01653203/001") == ("9000099", 72)
    assert oai.parse_oai_path("somewhere/file.dcm") == (None, None)


# ----------------------------------------------------------------------------- the pipeline


def _rgb(path: Path) -> None:
    """Overwrite with an RGB secondary capture that claims to be the knee series."""
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 8, 8, 7
    ds.Rows, ds.Columns = 32, 40
    ds.PixelData = np.zeros((32, 40, 3), np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """6 patients x 2 visits of 800x1000 films (0.3-0.4 mm/px so both legs fit), then one film
    each re-encoded JPEG lossless / JPEG 2000 / RLE, truncated, RGB, and stripped of spacing."""
    root = tmp_path_factory.mktemp("oai_tree")
    truth = write_dicom_tree(root, n_patients=6, seed=3, shape=(800, 1000), visits=(12, 24),
                             spacing_range=(0.3, 0.4), progress=False)
    films = truth.groupby("path")["klg_label"].apply(lambda s: s.notna().all())
    clean = [p for p in films.index if films[p]]  # both knees graded
    variants = dict(zip(["jpeg_lossless", "j2k", "rle", "truncated", "rgb", "nospacing"], clean))
    for kind, rel in variants.items():
        path = root / rel
        if kind == "jpeg_lossless":
            jpeg_lossless(path, path)
        elif kind in ("j2k", "rle"):
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless if kind == "j2k" else RLELossless)
            ds.save_as(path, enforce_file_format=True)
        elif kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "rgb":
            _rgb(path)
        elif kind == "nospacing":
            ds = pydicom.dcmread(path)
            for tag in ("ImagerPixelSpacing", "PixelSpacing"):
                if tag in ds:
                    delattr(ds, tag)
            ds.save_as(path, enforce_file_format=True)
    labels = sorted(root.glob("kxr_sq_bu*.txt"))
    contents = sorted(root.glob("*m/contents.csv"))
    return {"root": root, "truth": truth, "variants": variants, "labels": labels, "contents": contents}


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    """`klgrade prepare oai` through the CLI (header scan, 1 worker), its output captured."""
    import contextlib
    import io as _io

    out = tmp_path_factory.mktemp("oai_out")
    argv = ["prepare", "oai", "--images", str(tree["root"]), "--labels", *map(str, tree["labels"]),
            "--out", str(out), "--no-progress", "--seed", "1"]
    stdout, stderr = _io.StringIO(), _io.StringIO()
    handler = logging.StreamHandler(stderr)
    logging.getLogger("klgrade").addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)
    finally:
        logging.getLogger("klgrade").removeHandler(handler)
    return {"out": out, "rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_prepare_outcomes(tree, prepared):
    assert prepared["rc"] == 0, prepared["stderr"]
    out, truth, var = prepared["out"], tree["truth"], tree["variants"]
    m = read_manifest(out)  # validates columns, grades, files and patient-level split
    assert set(m["source"]) == {"oai"} and set(m["split"]) <= {"train", "val", "test"}
    assert (m["split"] != "").all()
    rej = pd.read_csv(out / "rejects.csv", dtype={"patient_id": str})
    reasons = {(Path(p).relative_to(tree["root"]).as_posix(), s if isinstance(s, str) else ""): r
               for p, s, r in zip(rej["path"], rej["side"], rej["reason"])}

    def reason(rel, side):
        return reasons.get((rel, side), "")

    for side in "RL":
        assert reason(var["truncated"], side).startswith("unreadable DICOM: truncated pixel data")
        assert reason(var["rgb"], side).startswith("unreadable DICOM: colour image")
        assert reason(var["nospacing"], side).startswith("no pixel spacing")
    ungraded = truth[truth["klg_label"].isna()]
    assert len(ungraded) >= 1
    for r in ungraded.itertuples():
        assert reason(r.path, r.side) == "no KL grade (missing code .M)"
    # every other knee is in the manifest with its grade, joint within 5 mm of the truth
    bad = {var[k] for k in ("truncated", "rgb", "nospacing")}
    expect = truth[truth["klg_label"].notna() & ~truth["path"].isin(bad)]
    got = m.set_index(["dicom", "side"])
    assert len(m) == len(expect)
    for r in expect.itertuples():
        row = got.loc[(r.path, r.side)]
        assert row["klg"] == r.klg_label and row["patient_id"] == r.patient_id and row["visit"] == r.visit
        assert np.hypot(row["joint_x"] - r.x, row["joint_y"] - r.y) * r.spacing_mm <= 5.0
        assert row["photometric"] == r.photometric
        assert row["spacing_source"] == ("PixelSpacing" if r.spacing_tag == "PixelSpacing"
                                         else "ImagerPixelSpacing")
    syntaxes = {got.loc[(var[k], "R"), "transfer_syntax"] for k in ("jpeg_lossless", "j2k", "rle")}
    assert any("JPEG Lossless" in s for s in syntaxes) and any("2000" in s for s in syntaxes)
    assert any("RLE" in s for s in syntaxes)
    assert "MONOCHROME1" in set(m["photometric"])  # the tree's MONOCHROME1 films were cropped too
    # crops: 16-bit, 400 px, ids and paths as documented
    crop = Image.open(out / m["path"].iloc[0])
    assert crop.size == (400, 400) and crop.mode.startswith("I")
    assert m["image_id"].iloc[0] == f"{m['patient_id'].iloc[0]}_{m['visit'].iloc[0]:02d}m_{m['side'].iloc[0]}"
    # summary + contact sheet
    s = json.loads((out / "summary.json").read_text())
    assert s["knee_images"] == len(m) and sum(s["per_grade"].values()) == len(m)
    assert s["reject_reasons"]["unreadable DICOM"] == 4 and s["reject_reasons"]["no pixel spacing"] == 2
    assert s["other_series"] >= 1
    assert "knee crops from" in prepared["stdout"] and "visit (months) x KL grade" in prepared["stdout"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 8 * 160


def test_left_knees_are_flipped(tree, prepared):
    """On the film the right knee has its fibula on the image's left and the left knee is its
    mirror; the stored crops are the film cut around the joint, mirrored for left knees only, so
    every crop shows the lateral side on the left."""
    from klgrade.ingest.crop import crop_square, to_uint16
    from klgrade.ingest.dicom import read_radiograph

    m = read_manifest(prepared["out"])
    for side in "RL":
        r = m[m["side"] == side].iloc[0]
        rad = read_radiograph(tree["root"] / r["dicom"])
        raw = to_uint16(crop_square(rad.pixels, (r["joint_x"], r["joint_y"]), 140.0, rad.spacing_mm, 400))
        stored = np.asarray(Image.open(prepared["out"] / r["path"]), dtype=np.int32)
        expect = raw[:, ::-1] if side == "L" else raw
        # joint_x/y are rounded to 0.1 px in the manifest: allow a small resampling difference
        assert np.abs(stored - expect.astype(np.int32)).mean() < 300
        assert np.abs(stored - expect[:, ::-1].astype(np.int32)).mean() > 2000


def test_no_patient_identifiers_anywhere(tree, prepared):
    secrets = set()
    for col in ("dicom_patient_name", "dicom_patient_id", "dicom_birth_date"):
        secrets |= set(tree["truth"][col].astype(str))
    secrets |= {s.split("^")[-1] for s in tree["truth"]["dicom_patient_name"]}
    texts = [prepared["stdout"], prepared["stderr"]]
    for f in prepared["out"].rglob("*"):
        if f.is_file() and f.suffix in (".csv", ".json", ".jsonl", ".txt", ".yaml"):
            texts.append(f.read_text())
    blob = "\n".join(texts)
    leaked = sorted(s for s in secrets if s in blob)
    assert not leaked


def test_contents_mode_workers_and_resume(tree, prepared, tmp_path):
    out = tmp_path / "ds"
    res = oai.prepare_oai(tree["root"], tree["labels"], out, contents=tree["contents"], workers=2,
                          seed=1, progress=False)
    ref = read_manifest(prepared["out"])
    cols = ["image_id", "path", "patient_id", "visit", "side", "klg", "split"]
    pd.testing.assert_frame_equal(res.manifest[cols].reset_index(drop=True), ref[cols].reset_index(drop=True),
                                  check_dtype=False)
    assert res.processed == res.summary["films"] and res.resumed == 0
    # a second run reads nothing
    again = oai.prepare_oai(tree["root"], tree["labels"], out, contents=tree["contents"], seed=1,
                            progress=False)
    assert again.processed == 0 and again.resumed == res.summary["films"]
    # simulate a kill: one crop lost, the log's last line cut short → only those films are redone
    first = again.manifest.iloc[0]
    (out / first["path"]).unlink()
    log_path = out / oai.PROGRESS_NAME
    lines = log_path.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    log_path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    third = oai.prepare_oai(tree["root"], tree["labels"], out, contents=tree["contents"], seed=1,
                            progress=False)
    redone = {first["dicom"], last["rel"]}
    assert third.processed == len(redone)
    pd.testing.assert_frame_equal(third.manifest[cols], res.manifest[cols])
    # other crop parameters are a different dataset: everything is redone
    fourth = oai.prepare_oai(tree["root"], tree["labels"], tmp_path / "small", contents=tree["contents"],
                             size=64, mm_per_px=2.0, progress=False, sheet_samples=0)
    assert Image.open(tmp_path / "small" / fourth.manifest["path"].iloc[0]).size == (64, 64)


def test_bad_input_is_one_clear_error(tree, tmp_path, capsys):
    rc = main(["prepare", "oai", "--images", str(tmp_path / "absent"), "--labels", *map(str, tree["labels"]),
               "--out", str(tmp_path / "o")])
    assert rc == 1 and "no such image folder" in capsys.readouterr().err
    bad = tmp_path / "labels.txt"
    bad.write_text("nothing here\n")
    rc = main(["prepare", "oai", "--images", str(tree["root"]), "--labels", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 1 and "labels.txt" in capsys.readouterr().err


def test_series_scan_skips_other_series(tree):
    by_header, rej_h, counts_h = oai.series_from_headers(tree["root"], progress=False)
    by_contents, rej_c, counts_c = oai.series_from_contents(tree["contents"], tree["root"])
    assert counts_h["other_series"] == counts_c["other_series"] >= 1
    # the truncated and RGB films still carry the knee SeriesDescription: both scans list all films
    films = set(tree["truth"]["path"])
    rel = {Path(p).relative_to(tree["root"]).as_posix() for p in by_contents["path"]}
    assert rel == films
    assert {Path(p).relative_to(tree["root"]).as_posix() for p in by_header["path"]} == films
    assert set(by_contents["visit"]) == {12, 24}
