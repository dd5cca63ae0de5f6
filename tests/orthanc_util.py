"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) started by the tests themselves.

Each server gets its own temporary JSON config and storage folder, a free 127.0.0.1 HTTP port,
the DICOM port disabled (and set to another free port in case the option is ignored), the
DicomWeb plugin at /dicom-web/ and HTTP basic auth (so every test goes through the credentials
path). Without the binary the tests skip with the reason on a developer's machine, but fail in
CI (env CI=1 or KLGRADE_REQUIRE_ORTHANC=1): there they must run.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

USER, PASSWORD = "klgrade", "s3cret-not-logged"
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/libOrthancDicomWeb.so*")


def find_orthanc() -> tuple[str | None, str | None]:
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                              if os.access(p, os.X_OK)), None)
    plugin = next((p for g in PLUGIN_GLOBS for p in sorted(glob.glob(g))), None)
    return binary, plugin


def require_orthanc() -> tuple[str, str]:
    binary, plugin = find_orthanc()
    if binary and plugin:
        return binary, plugin
    missing = "Orthanc binary" if not binary else "DicomWeb plugin (libOrthancDicomWeb.so)"
    msg = f"{missing} not found: apt-get install orthanc orthanc-dicomweb"
    if any(os.environ.get(v, "").lower() not in ("", "0", "false") for v in ("CI", "KLGRADE_REQUIRE_ORTHANC")):
        pytest.fail(f"{msg} (required: CI / KLGRADE_REQUIRE_ORTHANC is set)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process; ``url`` is its HTTP root, ``dicomweb`` the DICOMweb root."""

    def __init__(self, folder: Path, port: int | None = None):
        self.binary, self.plugin = require_orthanc()
        self.folder, self.port = Path(folder), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.env = {"KLGRADE_PACS_BASIC": f"{USER}:{PASSWORD}"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "klgrade-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.port, "RemoteAccessAllowed": False,
            "DicomServerEnabled": False, "DicomPort": free_port(), "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpThreadsCount": 4,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): "
                                   f"{(self.folder / 'orthanc.log').read_text()[-2000:]}")
            if self.answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.port} within {timeout:.0f} s")

    def request(self, path: str, data: bytes | None = None, method: str | None = None):
        import base64

        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def answers(self) -> bool:
        try:
            self.request("/dicom-web/studies?limit=1")
            return True
        except OSError:
            return False

    def count_instances(self) -> int:
        return int(self.request("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
