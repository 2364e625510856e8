"""Which code a benchmark measured, printed with its numbers: git HEAD, uncommitted changes to the
measured sources, and a digest of those sources as read (a benchmark compares the digest at start
and end, so an edit during a long run is noticed)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def files_digest(paths: tuple[str, ...]) -> str:
    """sha256 (12 hex digits) of the files' bytes, in the given order; paths relative to the repo."""
    return hashlib.sha256(b"".join((ROOT / path).read_bytes() for path in paths)).hexdigest()[:12]


def git_state(paths: tuple[str, ...]) -> str:
    """``git <HEAD>`` plus ``+ uncommitted <files>`` for changes below ``paths``; ``?`` outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths],
                                capture_output=True, text=True, timeout=10).stdout
        dirty = [line[3:] for line in status.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", []
    return f"git {head}{' + uncommitted ' + ', '.join(dirty) if dirty else ''}"
