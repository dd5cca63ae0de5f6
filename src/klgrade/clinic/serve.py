"""The grading web service: upload a radiograph, get each knee's grade, probabilities and Grad-CAM.

    from klgrade.clinic.serve import create_app
    app = create_app("runs/resnet18")            # the model loads here, once
    # uvicorn.run(app, host="127.0.0.1", port=8000)   (what `klgrade serve` does)

Routes:
- ``GET /``: a single page where a person drops a radiograph and sees each knee with its grade,
  a probability bar per grade and the heatmap.
- ``POST /predict`` (multipart field ``file``; query ``heatmaps=true|false``):
  ``{"run", "model", "layout", "knees": [...]}`` with the
  per-knee fields of ``klgrade predict --json``, plus ``view`` and ``heatmap`` as PNG data URLs.
  Over the size limit: 413. Not a usable radiograph: 400 with the reason.
- ``GET /info``: the loaded run (name, model, input size, TTA, heatmap layer).
- ``GET /healthz``: ``{"status": "ok"}`` once the model is loaded.

Privacy: the upload is written to a private temporary file under a fixed name and deleted after
grading, in a ``finally`` (uploads left by a server killed mid-request are swept at the next start);
its file name, DICOM header and path are never put in a response or a log line (errors call it
"the uploaded file"). Requests are logged as method, path and status only.

Hostile clients: only requests whose Host header names an allowed host are answered (400 otherwise),
which defeats DNS rebinding against a server on localhost. At most ``max_decodes`` uploads are
decoded at once (the others wait), so memory stays bounded by that many images at the pixel budget
(klgrade.ingest.images.max_pixels) whatever the number of concurrent uploads.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from klgrade import io
from klgrade.clinic.grader import ClinicError, Grader, data_url

log = logging.getLogger(__name__)

UPLOAD_NAME = "the uploaded file"
DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_DECODES = 2


def create_app(run_dir: str | Path | None = None, *, grader: Grader | None = None, device: str = "cpu",
               tta: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               heatmaps: bool = True, allowed_hosts=DEFAULT_ALLOWED_HOSTS,
               max_decodes: int = DEFAULT_MAX_DECODES):
    """A FastAPI app serving one run. Pass ``run_dir`` (loaded now, once) or a loaded ``grader``.
    ``allowed_hosts``: Host header values answered (``["*"]`` for any); ``max_decodes``: uploads
    decoded at once."""
    if grader is None:
        if run_dir is None:
            raise ValueError("create_app needs run_dir or grader")
        grader = Grader.from_run(run_dir, device=device, tta=tta)
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    limit = int(max_upload_mb * 1024 * 1024)
    page = resources.files("klgrade.clinic").joinpath("static/index.html").read_text(encoding="utf-8")

    app = FastAPI(title="klgrade", summary="Kellgren-Lawrence grading of knee radiographs",
                  docs_url=None, redoc_url=None)
    app.state.grader = grader
    _guard(app, limit, f"upload too large: the limit is {max_upload_mb:g} MB", allowed_hosts)
    decode_slots = threading.BoundedSemaphore(max(1, int(max_decodes)))
    io.sweep_stale(tempfile.gettempdir(), "upload")  # uploads of a server killed mid-request

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "run": grader.name}

    @app.get("/info")
    def info() -> dict:
        return {**grader.info(), "max_upload_mb": max_upload_mb}

    # A plain `def`: FastAPI runs it in its thread pool, so decoding and cropping of concurrent
    # uploads overlap while the model itself is used by one request at a time (Grader.lock).
    @app.post("/predict")
    def predict(file: UploadFile = File(..., description="a knee radiograph: DICOM, PNG or JPEG"),
                heatmaps_q: bool = Query(True, alias="heatmaps")) -> dict:
        tmp = tempfile.mkdtemp(prefix=io.scratch_prefix("upload"))
        try:
            path = Path(tmp) / "upload"
            if _save_upload(file, path) == 0:
                raise HTTPException(400, f"{UPLOAD_NAME} is empty")
            try:
                with decode_slots:
                    res = grader.predict_file(path, heatmaps=heatmaps and heatmaps_q, display=UPLOAD_NAME,
                                              include_view=True)
            except ClinicError as e:
                raise HTTPException(400, str(e).replace(str(path), UPLOAD_NAME)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the upload may hold patient data
        for k in res["knees"]:
            png = k.pop("_heatmap_png", None)
            if png is not None:
                k["heatmap"] = data_url(png)
        return {"run": grader.name, "model": grader.description, "tta": grader.tta, **res}

    return app


def _guard(app: FastAPI, limit: int, too_large: str, allowed_hosts) -> None:
    """Upload limits, the Host check and one JSON error shape for every refusal."""
    # Starlette's limit counts the bytes actually received, so a chunked upload without
    # Content-Length cannot stream past it into the temp file; its 413 reaches the JSON handler below.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=limit)
    # Added last = outermost: an oversized declared Content-Length is refused before any byte is read.
    app.add_middleware(ContentLengthLimit, max_body_size=limit, message=too_large)
    # Outermost of all: a request for a host we do not serve (DNS rebinding) gets nothing else.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # a clear JSON message for every HTTP error, 413 included
        detail = too_large if exc.status_code == 413 else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc):
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"expected a multipart upload with a 'file' field ({where})"},
                            status_code=400)


def _save_upload(file: UploadFile, path: Path) -> int:
    """Stream an upload to ``path`` in 1 MB chunks; the number of bytes written."""
    size = 0
    with open(path, "wb") as f:
        while chunk := file.file.read(1 << 20):
            size += len(chunk)
            f.write(chunk)
    return size


class ContentLengthLimit:
    """Pure ASGI: answer 413 with a JSON reason when the declared Content-Length is over the limit."""

    def __init__(self, app, max_body_size: int, message: str):
        self.app, self.max_body_size, self.message = app, max_body_size, message

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or ()).get(b"content-length")
            try:
                n = int(declared) if declared is not None else None
            except ValueError:
                n = None
            if n is not None and n > self.max_body_size:
                await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)
