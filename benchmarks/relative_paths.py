"""Rewrite absolute paths of this machine in result files as paths relative to the repository root
(results are committed; a reader's checkout lives elsewhere). Ignored files are left alone.

    python benchmarks/relative_paths.py results/ssl_kneekl224 results/study_pretrained_kneekl224
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".yaml", ".yml", ".json", ".csv", ".md", ".html", ".tex", ".txt", ".log"}


def ignored(f: Path) -> bool:
    """Git-ignored files (manifests, stores) are working data: their paths must keep resolving here."""
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(f)]).returncode == 0


def relativize(folder: Path) -> int:
    subs = [(f"{ROOT.parent / 'shared'}/", "../shared/"), (f"{ROOT}/", "")]
    changed = 0
    for f in folder.rglob("*"):
        if f.suffix not in TEXT or not f.is_file() or f.stat().st_size > 50_000_000 or ignored(f):
            continue
        text = f.read_text(errors="surrogateescape")
        new = text
        for old, rep in subs:
            new = new.replace(old, rep)
        if new != text:
            tmp = f.with_name(f".{f.name}.tmp")
            tmp.write_text(new, errors="surrogateescape")
            tmp.replace(f)
            changed += 1
    return changed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {relativize(Path(arg))} file(s) rewritten")
