"""`klgrade serve`: a local web page and JSON API that grade uploaded knee radiographs.

    klgrade serve --run runs/resnet18                       # http://127.0.0.1:8000/
    curl -F file=@knee.dcm http://127.0.0.1:8000/predict    # JSON: grade, probabilities, heatmaps

The model loads once at start-up. ``POST /predict`` takes a multipart upload (field ``file``) and
returns each knee's side, grade, probabilities, expected grade and a Grad-CAM overlay (PNG data
URL); ``GET /`` is a page to drop a radiograph on; ``GET /healthz`` is for monitoring. Uploads over
``--max-upload-mb`` get 413, files that are not usable radiographs 400 with the reason. Upload names
and DICOM headers are never logged or echoed. It binds to 127.0.0.1 by default: there is no
authentication or TLS, so put it behind a proxy that adds both before exposing it to a network.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("serve", help="web page + JSON API grading uploaded radiographs (FastAPI)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (CNN or embedding-head run)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default=None, metavar="H1,H2",
                   help="Host header values to answer, comma-separated ('*' for any); default localhost, "
                        "127.0.0.1, ::1 and --host. Others get 400 (defeats DNS rebinding)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload (default 50 MB)")
    p.add_argument("--tta", choices=["none", "flip"], default=None,
                   help="test-time augmentation (default: the run's setting)")
    p.add_argument("--no-heatmaps", action="store_true", help="never compute Grad-CAM (faster)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from klgrade.clinic.serve import DEFAULT_ALLOWED_HOSTS, create_app
    from klgrade.errors import UserError

    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535, got {args.port}")
    hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]
    if args.allowed_hosts is None:
        hosts = list(DEFAULT_ALLOWED_HOSTS) + ([args.host] if args.host not in ("0.0.0.0", "::") else [])
    if not hosts:
        raise UserError("--allowed-hosts names no host")
    app = create_app(args.run, device=args.device, tta=args.tta, max_upload_mb=args.max_upload_mb,
                     heatmaps=not args.no_heatmaps, allowed_hosts=hosts)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("klgrade.clinic").warning(
            "listening on %s: reachable from other machines, with no authentication or TLS", args.host)
    _limit_malloc_arenas()
    # uvicorn's access log line is "client - method path status": no upload name, no header.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread of FastAPI's pool its own malloc arena, and an image freed in one
    arena is not reused by the next request on another thread: RSS then grows with the number of
    threads that ever decoded a film, not with the uploads in flight. Two arenas keep it bounded."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except OSError:  # not glibc (musl, macOS): nothing to tune
        pass
