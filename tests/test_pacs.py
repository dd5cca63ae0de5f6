"""`klgrade pacs` against a real Orthanc (DICOMweb), and `klgrade predict --dicom-out`.

Synthetic OAI-shaped DICOMs go into a fresh Orthanc over STOW-RS, `klgrade pacs --once` grades
them, and the SR and SC are read back over DICOMweb. See tests/orthanc_util.py for the server.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from orthanc_util import PASSWORD, Orthanc, free_port

IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs", "StudyInstanceUID",
            "StudyDate", "StudyID", "AccessionNumber", "StudyDescription")


def cli(*argv: str, env: dict | None = None) -> tuple[int, str]:
    """Run the klgrade CLI in-process: (rc, stdout + stderr + log records)."""
    from klgrade.cli import main

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # what main's basicConfig sets when it owns the process
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            with _env(env or {}):
                rc = main(list(argv))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return rc, out.getvalue()


@contextlib.contextmanager
def _env(values: dict):
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict:
    """Two bilateral knee films (one study each), a lateral knee film, a hand film in the first
    film's study and a multi-frame knee instance in a study of its own."""
    from klgrade.synthetic import bilateral_dataset, save_dataset, to_stored, write_dicom_tree

    root = tmp_path_factory.mktemp("pacs_films")
    truth = write_dicom_tree(root, n_patients=1, seed=5, shape=(900, 1200), visits=(12, 24),
                             spacing_range=(0.25, 0.28), progress=False)
    knees = [root / p for p in truth["path"].unique()]
    others = [p for p in root.rglob("001") if p not in knees]
    first = pydicom.dcmread(knees[0])
    rng = np.random.default_rng(0)
    hand = bilateral_dataset(to_stored(rng.uniform(0.2, 0.8, (300, 240)).astype(np.float32)), 0.2,
                             series_description="PA Hand", body_part="HAND", uid_seed="hand")
    for kw in IDENTITY:  # the same patient and study as the first knee film
        if kw in first:
            setattr(hand, kw, first.data_element(kw).value)
    multi = pydicom.dcmread(knees[1])
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    for kw, tag in (("StudyInstanceUID", "mf-study"), ("SeriesInstanceUID", "mf-series"), ("SOPInstanceUID", "mf-sop")):
        setattr(multi, kw, pydicom.uid.generate_uid(entropy_srcs=[tag]))
    multi.file_meta.MediaStorageSOPInstanceUID = multi.SOPInstanceUID
    extra = {"hand": save_dataset(hand, root / "hand.dcm"), "multi": save_dataset(multi, root / "multi.dcm")}
    return {"knees": knees, "others": others, **extra}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(orthanc):
    from klgrade.clinic.pacs.dicomweb import make_client

    return make_client(orthanc.dicomweb, orthanc.env)


@pytest.fixture(scope="module")
def first_run(orthanc, client, films, tiny_cnn_run) -> dict:
    """Upload everything, then `klgrade pacs --once` (basic auth from the environment)."""
    files = [*films["knees"], *films["others"], films["hand"], films["multi"]]
    client.store_instances([pydicom.dcmread(f) for f in files])
    before = orthanc.count_instances()
    rc, out = cli("pacs", "--run", str(tiny_cnn_run), "--url", orthanc.dicomweb, "--once", env=orthanc.env)
    return {"rc": rc, "out": out, "before": before, "after": orthanc.count_instances()}


def fetch(client, study: str, modality: str) -> list:
    """Every instance of the given modality in the study, read back over WADO-RS."""
    out = []
    for s in client.search_for_series(study_instance_uid=study, search_filters={"Modality": modality}):
        sid = pydicom.Dataset.from_json(s).SeriesInstanceUID
        out += client.retrieve_series(study, sid)
    return out


def predict_json(run: Path, path: Path) -> list[dict]:
    rc, out = cli("predict", str(path), "--run", str(run), "--json")
    assert rc == 0, out
    return json.loads(out[out.index("{"):])["results"][0]["knees"]


# ---------------------------------------------------------------------- against Orthanc

def test_pacs_grades_equal_predict(first_run, client, films, tiny_cnn_run):
    from klgrade.clinic.pacs.sr import read_groups

    assert first_run["rc"] == 0, first_run["out"]
    for path in films["knees"]:
        src = pydicom.dcmread(path)
        (sr,) = fetch(client, src.StudyInstanceUID, "SR")
        groups = [g for g in read_groups(sr) if not g["label"].startswith("not graded")]
        local = predict_json(tiny_cnn_run, path)
        assert [g["klg"] for g in groups] == [k["klg"] for k in local]
        assert [g["laterality"] for g in groups] == ["24028007", "7771000"]  # SCT right, left
        for g, k in zip(groups, local):
            np.testing.assert_allclose(g["probabilities"], k["probabilities"], atol=1e-6)
            assert g["expected_grade"] == pytest.approx(k["expected_grade"], abs=1e-4)
            assert_same_jsw(g["jsw"], k["jsw"])


def assert_same_jsw(from_sr: dict, from_predict: dict) -> None:
    """The SR's JSW measurements are the numbers `predict --json` gives (both measured compartments)."""
    assert from_predict["unit"] == "mm"
    for c in ("medial", "lateral"):
        want = from_predict[c]
        if want["min"] is None:
            assert from_sr[c]["finding"] == f"{c.capitalize()} joint space not measured"
            continue
        assert from_sr[c]["unit"] == "mm"
        assert from_sr[c]["min"] == pytest.approx(want["min"], abs=1e-6)
        assert from_sr[c]["mean"] == pytest.approx(want["mean"], abs=1e-6)


def test_sr_and_sc_copy_the_source_identity(first_run, client, films):
    import highdicom as hd

    src = pydicom.dcmread(films["knees"][1])
    (sr,) = fetch(client, src.StudyInstanceUID, "SR")
    (sc,) = fetch(client, src.StudyInstanceUID, "OT")
    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)  # highdicom reads it back
    assert parsed.content.get_image_measurement_groups()
    for obj in (sr, sc):
        for kw in IDENTITY:
            assert obj.get(kw) == src.get(kw), kw
        assert obj.SeriesInstanceUID != src.SeriesInstanceUID and obj.SOPInstanceUID != src.SOPInstanceUID
    content = sr.to_json()  # the algorithm identification: name, version, weights fingerprint
    assert "weights sha1: " in content and "klgrade tiny_cnn" in content and "Algorithm Version" in content


def test_sc_opens_as_an_image(first_run, client, films):
    from PIL import Image

    src = pydicom.dcmread(films["knees"][0])
    (sc,) = fetch(client, src.StudyInstanceUID, "OT")
    img = Image.fromarray(sc.pixel_array)
    assert img.mode == "RGB" and min(img.size) > 300
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR PRIMARY DIAGNOSIS" in sc.ImageComments and "NOT FOR PRIMARY DIAGNOSIS" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_ungradable_instances_are_skipped_with_a_reason(first_run, client, films):
    from klgrade.clinic.pacs.sr import read_groups

    out = first_run["out"]
    multi = pydicom.dcmread(films["multi"])
    (sr,) = fetch(client, multi.StudyInstanceUID, "SR")
    assert [g["label"] for g in read_groups(sr)] == ["not graded: multi-frame image (2 frames); expected one radiograph"]
    assert not fetch(client, multi.StudyInstanceUID, "OT")  # nothing to show: no capture
    hand_study = pydicom.dcmread(films["hand"]).StudyInstanceUID
    (sr,) = fetch(client, hand_study, "SR")
    labels = [g["label"] for g in read_groups(sr)]
    assert "not graded: not a knee (BodyPartExamined HAND)" in labels and "right knee" in labels
    assert "not graded: multi-frame image" in out and "not graded: not a knee" in out


def test_log_has_no_patient_identifiers_nor_password(first_run, films):
    out = first_run["out"]
    assert "graded and stored" in out
    for path in [*films["knees"], films["multi"]]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
                   "StudyInstanceUID"):
            assert str(ds.get(kw)) not in out, kw
    assert PASSWORD not in out


def test_second_run_adds_nothing(first_run, orthanc, tiny_cnn_run, films):
    # 2 knee films + hand: SR + SC each for the two knee studies; SR for the lateral and multi-frame
    n_studies = len(films["knees"]) + sum("Lateral" in str(pydicom.dcmread(p).SeriesDescription)
                                          for p in films["others"]) + 1
    assert first_run["after"] == first_run["before"] + 2 * len(films["knees"]) + (n_studies - len(films["knees"]))
    rc, out = cli("pacs", "--run", str(tiny_cnn_run), "--url", orthanc.dicomweb, "--once", env=orthanc.env)
    assert rc == 0, out
    assert f"{n_studies} already graded" in out and "0 graded and stored" in out
    assert orthanc.count_instances() == first_run["after"]


def test_wrong_password_is_one_clear_line(orthanc, tiny_cnn_run):
    rc, out = cli("pacs", "--run", str(tiny_cnn_run), "--url", orthanc.dicomweb, "--once",
                  env={"KLGRADE_PACS_BASIC": "klgrade:wrong-secret"})
    assert rc == 1
    assert "refused access (QIDO-RS: HTTP 401)" in out and "KLGRADE_PACS_BASIC" in out
    assert "wrong-secret" not in out and "Traceback" not in out


def test_pacs_down_is_one_clear_line(tiny_cnn_run):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc, out = cli("pacs", "--run", str(tiny_cnn_run), "--url", url, "--once")
    assert rc == 1 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == (f"klgrade pacs: error: cannot reach the PACS at {url} "
                                            f"(QIDO-RS: ConnectionError)")


def test_poll_retries_and_recovers_when_the_pacs_comes_back(tmp_path, films, tiny_cnn_run):
    from klgrade.clinic.grader import Grader
    from klgrade.clinic.pacs.dicomweb import PacsJob, make_client, poll
    from klgrade.clinic.pacs.grading import model_info

    server = Orthanc(tmp_path / "late")  # its port is chosen now, the server starts later
    grader = Grader.from_run(tiny_cnn_run)
    job = PacsJob(make_client(server.dicomweb, server.env, timeout=5), grader, model_info(grader), server.dicomweb)
    lines, stop = [], threading.Event()
    worker = threading.Thread(target=poll, args=(job, 0.2), kwargs=dict(stop=stop, max_backoff=0.5, echo=lines.append))
    worker.start()
    try:
        _wait(lambda: len(lines) >= 2, 20)
        assert all("cannot reach the PACS" in line and "retrying in" in line for line in lines)
        server.start()
        make_client(server.dicomweb, server.env).store_instances([pydicom.dcmread(films["knees"][0])])
        _wait(lambda: any("graded and stored" in line for line in lines), 60)
        assert any("answers again" in line for line in lines)
        assert server.count_instances() == 3  # film + SC + SR
    finally:
        stop.set()
        worker.join(30)
        server.stop()


def _wait(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---------------------------------------------------------------------- local, no PACS

def test_predict_dicom_out_writes_the_same_sr_and_sc(tmp_path, films, tiny_cnn_run, synth_png):
    import highdicom as hd

    from klgrade.clinic.pacs.sr import read_groups

    film = films["knees"][0]
    rc, out = cli("predict", str(film), "--run", str(tiny_cnn_run), "--dicom-out", str(tmp_path / "dcm"), "--json")
    assert rc == 0, out
    local = json.loads(out[out.index("{"):])["results"][0]["knees"]
    srs, scs = sorted((tmp_path / "dcm").glob("*_sr.dcm")), sorted((tmp_path / "dcm").glob("*_sc.dcm"))
    assert len(srs) == 1 and len(scs) == 1
    sr = hd.sr.srread(srs[0])
    groups = read_groups(sr)
    assert [g["klg"] for g in groups] == [k["klg"] for k in local]
    assert sum(k["jsw"]["medial"]["min"] is not None for k in local) == 2  # both knees measured
    for g, k in zip(groups, local):
        assert_same_jsw(g["jsw"], k["jsw"])
    capture = pydicom.dcmread(scs[0]).pixel_array
    assert capture.shape[2] == 3
    # the measured lines are in the capture: right of the Grad-CAM panels, the knees' gray views
    # carry the condyle margins (cyan) and plateau margins (yellow) the page draws
    from klgrade.clinic.pacs.sc import PANEL

    r, g, b = (capture[:, -PANEL - 8:, i].astype(int) for i in range(3))
    assert ((r < 100) & (g > 150) & (b > 180)).sum() > 50  # cyan
    assert ((r > 180) & (g > 150) & (b < 100)).sum() > 50  # yellow
    png = next(synth_png.rglob("*.png"))
    rc, out = cli("predict", str(png), "--run", str(tiny_cnn_run), "--dicom-out", str(tmp_path / "dcm2"))
    assert rc == 1 and "--dicom-out needs a DICOM input" in out and "Traceback" not in out


def test_capture_draws_the_jsw_on_the_display_view_the_heatmap_used(films, tiny_cnn_run, monkeypatch):
    # the display view is the graded crop cut again at 384 px, not the knee located again (~12 ms
    # of CPU a knee): cut once per knee, for the Grad-CAM panel and the measured lines alike
    import klgrade.view.entrance as entrance
    from klgrade.clinic.grader import DISPLAY_PX, Grader
    from klgrade.clinic.pacs.grading import grade_instance

    grader = Grader.from_run(tiny_cnn_run, tta="none")
    film = films["knees"][0]
    made, recut = [], []
    make_view, recut_view = entrance.make_view, entrance.recut_view

    def counted_make(img, size, **kw):
        made.append(size)
        return make_view(img, size, **kw)

    def counted_recut(img, size, info, spacing=None):
        recut.append(size)
        return recut_view(img, size, info, spacing)

    monkeypatch.setattr(entrance, "make_view", counted_make)
    monkeypatch.setattr(entrance, "recut_view", counted_recut)
    res = grade_instance(grader, film, pydicom.dcmread(film, stop_before_pixels=True))
    assert [k["klg"] is not None for k in res.knees] == [True, True]
    assert sum(o is not None and o.shape[:2] == (DISPLAY_PX, DISPLAY_PX) for o in res.jsw_overlays) == 2
    assert recut == [DISPLAY_PX, DISPLAY_PX] and DISPLAY_PX not in made
    assert all("_jsw_overlay" not in k for k in res.knees)


def test_sr_jsw_in_relative_units_and_flags_round_trip(films):
    """A film without pixel spacing gives % of the plateau width, a collapsed compartment 0 with
    its finding, an unmeasured one its finding and no number: all read back through highdicom."""
    from klgrade.clinic.pacs.grading import InstanceResult, ModelInfo
    from klgrade.clinic.pacs.sr import build_sr, read_groups

    header = pydicom.dcmread(films["knees"][0], stop_before_pixels=True)
    jsw = {"unit": "%plateau", "ok": False, "reason": "lateral: margins not found", "note": None,
           "medial_side": "right",
           "medial": {"min": 0.0, "mean": 0.412, "ok": True, "flag": "bone_on_bone", "reason": None},
           "lateral": {"min": None, "mean": None, "ok": False, "flag": "not_measured", "reason": "margins not found"}}
    knee = {"side": "R", "side_name": "right", "klg": 4, "probabilities": [0, 0, 0.1, 0.2, 0.7],
            "expected_grade": 3.6, "jsw": jsw}
    model = ModelInfo(name="m", description="d", version="0", fingerprint="ab" * 20)
    sr = build_sr([InstanceResult(header=header, knees=[knee])], model, "1.2.3.4", "1.2.3.5")
    (group,) = read_groups(sr.__class__.from_dataset(pydicom.dcmread(io.BytesIO(_bytes(sr)))))
    assert group["jsw"] == {
        "medial": {"min": 0.0, "mean": pytest.approx(0.412), "unit": "%", "finding": "Medial compartment bone on bone"},
        "lateral": {"min": None, "mean": None, "unit": None, "finding": "Lateral joint space not measured"}}
    assert "JSWREL" in str(sr)  # the method: relative to the plateau width


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("header, reason", [
    ({"BodyPartExamined": "HAND"}, "not a knee (BodyPartExamined HAND)"),
    ({"SeriesDescription": "Chest PA"}, "not a knee (no BodyPartExamined"),
    ({"BodyPartExamined": "KNEE", "ViewPosition": "LL"}, "lateral view"),
    ({"SeriesDescription": "Lateral Left Knee"}, "lateral view"),
    ({"SeriesDescription": "Bilateral PA Fixed Flexion Knee"}, ""),
])
def test_skip_reason(header, reason):
    from klgrade.clinic.pacs.grading import skip_reason

    ds = pydicom.Dataset()
    for k, v in header.items():
        setattr(ds, k, v)
    assert skip_reason(ds).startswith(reason) and bool(reason) == bool(skip_reason(ds))


def test_the_client_asks_for_the_pixels_as_stored_not_gzipped():
    # requests asks for gzip by default; Orthanc then spent ~0.7 s compressing a 10 MB film that it
    # sends as stored in ~0.03 s: every request klgrade makes says identity
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from klgrade.clinic.pacs.dicomweb import make_client

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Accept-Encoding"), self.headers.get("Authorization")))
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        make_client(url, {"KLGRADE_PACS_BASIC": "u:p"}).search_for_studies()
        make_client(url, {}).search_for_series()
    finally:
        server.shutdown()
        server.server_close()
    assert [s[1] for s in seen] == ["identity", "identity"]
    assert seen[0][2].startswith("Basic ") and seen[1][2] is None  # the credentials still go along
