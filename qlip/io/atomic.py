"""Atomic file writes: write to a temporary file in the target folder, fsync, then rename.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the complete new
one, never a half-written file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """``writer(tmp_path)`` writes the content; the result appears at ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, _w)


def fsync_path(path: str) -> None:
    """fsync a file or folder by path; a no-op where the filesystem does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)
