"""Atomic file writes: a crash never leaves a half-written artifact behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual permissions (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# Scratch files and folders of klgrade processes are named "klgrade-<kind>.<pid>.<host>.<...>", so a
# file left by a killed process (SIGKILL runs no cleanup) is recognisable and can be swept later.
TMP_PREFIX = "klgrade-"
STALE_AFTER_S = 7 * 24 * 3600  # other machines' leftovers (a shared folder): swept after a week


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def scratch_prefix(kind: str) -> str:
    """Prefix for a scratch file or folder of this process, e.g. ``klgrade-upload.1234.ab12cd34.``."""
    return f"{TMP_PREFIX}{kind}.{os.getpid()}.{_host_tag()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: str | os.PathLike, kind: str) -> int:
    """Remove ``kind`` scratch files/folders in ``folder`` left by processes that no longer run (on this
    machine) or older than STALE_AFTER_S (another machine's); return how many were removed."""
    import shutil
    import time

    host, removed = _host_tag(), 0
    try:
        entries = list(Path(folder).glob(f"{TMP_PREFIX}{kind}.*"))
    except OSError:
        return 0
    for p in entries:
        parts = p.name[len(TMP_PREFIX) + len(kind) + 1:].split(".")
        try:
            pid, tag = int(parts[0]), parts[1]
            stale = (not _alive(pid)) if tag == host else time.time() - p.lstat().st_mtime > STALE_AFTER_S
        except (IndexError, ValueError, OSError):
            continue
        if stale and pid != os.getpid():
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed += 1
            except OSError:
                pass  # another sweeper got there first, or not ours to remove
    return removed


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml(path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def write_csv(path, df, **kwargs) -> None:
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)


def torch_save(path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
