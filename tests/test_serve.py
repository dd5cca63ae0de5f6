"""klgrade serve: the FastAPI app (200 / 400 / 413, heatmaps as data URLs, nothing identifying echoed)."""
from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from klgrade.clinic.grader import Grader
from klgrade.clinic.serve import create_app

PATIENT_NAME = "SYNTH^ANONYMOUS"  # what bilateral_dataset writes into PatientName
UPLOAD_NAME = "DOE^JANE_9912345_left.dcm"  # a file name that identifies someone


@pytest.fixture(scope="module")
def client(tiny_cnn_run):
    app = create_app(grader=Grader.from_run(tiny_cnn_run), max_upload_mb=4)
    with TestClient(app, base_url="http://localhost") as c:  # an allowed Host
        yield c


def _png_from_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_info_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["img_size"] == 64 and info["heatmaps"] and info["max_upload_mb"] == 4
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="drop"' in page.text and 'id="results"' in page.text and "/predict" in page.text


def test_predict_bilateral_dicom(client, bilateral_dicom, caplog):
    data = bilateral_dicom[0].read_bytes()
    with caplog.at_level(logging.DEBUG):
        r = client.post("/predict", files={"file": (UPLOAD_NAME, data, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["layout"] == "bilateral" and [k["side"] for k in body["knees"]] == ["R", "L"]
    for k in body["knees"]:
        assert 0 <= k["klg"] <= 4 and abs(sum(k["probabilities"]) - 1) < 1e-4
        heat, view = _png_from_data_url(k["heatmap"]), _png_from_data_url(k["view"])
        assert heat.mode == "RGB" and view.mode == "L" and heat.size == view.size
    # nothing identifying in the answer or the log: no upload name, no DICOM patient field, no path
    # (the images are base64 data URLs: a random "DOE" can occur inside them, so every one of them
    # is left out here, at any depth)
    def without_images(x):
        if isinstance(x, dict):
            return {k: without_images(v) for k, v in x.items()}
        if isinstance(x, list):
            return [without_images(v) for v in x]
        return "<image>" if isinstance(x, str) and x.startswith("data:image/") else x

    plain = json.dumps(without_images(body))
    for text in (plain, caplog.text):
        assert "DOE" not in text and "9912345" not in text and PATIENT_NAME not in text
        assert "klgrade-upload" not in text and "/tmp" not in text
    r = client.post("/predict?heatmaps=false", files={"file": ("x", data)})
    assert r.status_code == 200 and "heatmap" not in r.json()["knees"][0]


def test_predict_png(client, synth_png):
    png = next((synth_png / "images").rglob("*.png"))
    r = client.post("/predict", files={"file": ("knee.png", png.read_bytes(), "image/png")})
    assert r.status_code == 200
    (k,) = r.json()["knees"]
    assert k["side"] == "U" and k["heatmap"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("payload, fragment", [
    (b"this is not an image", "not a readable image"),
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "not a readable image"),  # a truncated PNG
])
def test_non_images_are_400_with_a_reason(client, payload, fragment):
    r = client.post("/predict", files={"file": (UPLOAD_NAME, payload, "image/png")})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert fragment in detail and "the uploaded file" in detail
    assert "DOE" not in detail and "/tmp" not in detail


def test_bad_requests_are_400(client):
    r = client.post("/predict")  # no file field
    assert r.status_code == 400 and "'file' field" in r.json()["detail"]


def test_upload_over_the_limit_is_413(client):
    big = b"\0" * (4 * 1024 * 1024 + 1)
    r = client.post("/predict", files={"file": ("big.dcm", big)})
    assert r.status_code == 413 and "4 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes actually received
        for _ in range(5):
            yield b"\0" * (1024 * 1024)

    r = client.post("/predict", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "4 MB" in r.json()["detail"]


def test_create_app_loads_a_run_once(tiny_cnn_run, tmp_path):
    app = create_app(tiny_cnn_run, max_upload_mb=1)
    assert isinstance(app.state.grader, Grader) and app.state.grader.img_size == 64
    from klgrade.rundir import RunError

    with pytest.raises(RunError, match="not a klgrade run"):
        create_app(tmp_path)
