"""Writing files whole or not at all: the one atomic-write helper of the package.

    with atomic_write("out/config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f)                     # published only if the block finishes

    with atomic_path("out/model.safetensors") as tmp:
        save_file(state_dict, tmp)            # for writers that want a file name

How: the data goes to a fresh temporary file in the target's own directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name (never a fixed name: no user file is
clobbered, a planted symlink is never followed, two writers never share a temporary file), with
mode ``0o666`` so the result has the permissions any new file gets (``0644`` under the usual
umask). On success it is flushed, ``fsync``'d and renamed over the target with ``os.replace``
(atomic on POSIX: readers see the old file or the new one, never a mix; a symlink at the target
is replaced, its target left alone), then the directory is ``fsync``'d. On any failure,
``KeyboardInterrupt`` included, the temporary file is removed and the target is untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import IO, Iterator, Optional

__all__ = ["atomic_path", "atomic_write"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temp(path: str) -> tuple:
    """(fd, name) of a new empty file next to ``path``, under a name nobody else holds."""
    directory, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # astronomically unlikely; try another name
            continue


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not every platform or file system lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(fd: int, tmp: str, path: str) -> None:
    os.fsync(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _temporary(path: str) -> Iterator[tuple]:
    """(fd, name) of a temporary file next to ``path``, removed if the block raises."""
    fd, tmp = _create_temp(path)
    try:
        yield fd, tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yields the name of a new empty temporary file next to ``path``; when the block finishes it
    replaces ``path`` (see the module docstring), when it raises it is removed.

    For writers that take a file name (``safetensors.torch.save_file``): they write to the yielded
    name, which only this process knows.
    """
    path = os.fspath(path)
    with _temporary(path) as (fd, tmp):
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        yield tmp
        # The writer may have replaced the file under that name (safetensors does, as 0600): fsync
        # what the name holds now, with the permissions a new file gets.
        written = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fchmod(written, mode)
            _publish(written, tmp, path)
        finally:
            os.close(written)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: Optional[str] = None) -> Iterator[IO]:
    """Yields a file object (``mode`` ``"wb"`` or ``"w"``; ``encoding`` for text) whose contents
    replace ``path`` when the block finishes; if the block raises, ``path`` is left as it was.

    ``path`` must not be an existing directory (``IsADirectoryError`` when publishing).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    with _temporary(path) as (fd, tmp):
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None, closefd=False) as f:
            yield f
        _publish(fd, tmp, path)
