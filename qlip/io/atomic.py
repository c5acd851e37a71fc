"""Atomic writes: write to a temporary file (or folder) next to the target, fsync, then rename.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the complete new
one, never a half-written file; a command that fails leaves nothing behind.

Files get mode 0666 and folders 0777, both reduced by the process umask, exactly like
``open(path, "w")`` and ``os.makedirs``: files we write are as readable as any other file the user
creates. (``tempfile.mkstemp`` makes 0600 files, and so do writers that replace the temporary file
with their own, such as safetensors' ``save_file``: the mode is therefore set after writing.)
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Callable, Iterator

from ..errors import QLIPError

_ATTEMPTS = 100


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (briefly) and restoring
    os.umask(mask)
    return mask


def _temp_name(path: str, suffix: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{secrets.token_hex(4)}{suffix}")


def _new_temp_file(path: str) -> str:
    """Create an empty, exclusive temporary file next to ``path`` (mode 0666 & ~umask)."""
    for _ in range(_ATTEMPTS):
        tmp = _temp_name(path, ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _new_temp_folder(path: str) -> str:
    """Create an empty temporary folder next to ``path`` (mode 0777 & ~umask)."""
    for _ in range(_ATTEMPTS):
        tmp = _temp_name(path, ".tmpdir")
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary folder next to {path}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield a temporary folder next to ``path`` to fill; on success its files appear in ``path``.

    A new ``path`` is the temporary folder renamed in one step. An existing folder keeps its other
    files and gets each new file by an atomic rename. On failure the temporary folder is removed,
    so a failed write leaves ``path`` as it was (or absent).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise QLIPError(f"{path}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _new_temp_folder(path)
    try:
        yield tmp
        if not os.path.exists(path):
            os.replace(tmp, path)
        else:
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
        fsync_path(path)
        fsync_path(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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
