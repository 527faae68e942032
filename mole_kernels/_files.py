"""Writing files whole or not at all, alone or as a set: the package's atomic-write helpers.

    with atomic_write("out/config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f)                     # published only if the block finishes

    with FolderUpdate("out", "save_pretrained") as up:   # several files, one commit
        write_weights(up.temp_for("model.safetensors"))
        write_config(up.temp_for("config.json"))
        up.remove("pytorch_model.bin")        # stale files, removed after the new ones are in place

One file: the data goes to a fresh temporary file in the target's own directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name (never a fixed name: no user file is
clobbered, a planted symlink is never followed, two writers never share a temporary file), with
mode ``0o666`` so the result has the permissions any new file gets (``0644`` under the usual
umask). On success it is flushed, ``fsync``'d and renamed over the target with ``os.replace``
(atomic on POSIX: readers see the old file or the new one, never a mix; a symlink at the target
is replaced, its target left alone), then the directory is ``fsync``'d. On any failure,
``KeyboardInterrupt`` included, the temporary file is removed and the target is untouched.

A set of files (:class:`FolderUpdate`): no sequence of renames swaps two files at once, so the
commit is one more file, a journal (``.mole-update.json``) naming each new file's temporary name
and the stale files, itself published atomically after every new file is fsynced. Until the
journal exists the folder holds the old set; once it does, the new set is decided: the renames
and removals are applied, then the journal is removed. A reader sees a consistent set at any
instant through :func:`folder_file` (which reads through a journal that a killed writer left
behind), and the next update of the folder finishes such a journal first.

Leftovers: a writer holds an ``flock`` on its temporary file while it lives, so a temporary file
nobody holds is one a killed writer left behind; the next write of the same target (or the next
update of the folder) removes those, never a live writer's.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
from typing import IO, Dict, Iterator, List, Optional

__all__ = ["FolderUpdate", "atomic_write", "check_replaceable", "folder_file", "target_name"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_TEMP = re.compile(r"^\.(.+)\.[0-9a-f]{12}\.tmp$")  # .<target name>.<random>.tmp
JOURNAL = ".mole-update.json"


def target_name(path) -> str:
    """The file name ``path`` stands for: its own, or, for a temporary file of this module, its target's."""
    name = os.path.basename(os.fspath(path))
    m = _TEMP.match(name)
    return m.group(1) if m else name


def check_replaceable(path, where: str) -> None:
    """ValueError unless ``path`` is absent, a regular file or a symlink that does not lead to
    anything else: a folder, FIFO, socket or device (``/dev/null``) is never replaced by a file."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{where}: the output path is empty")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # absent, or a dangling symlink (replaced by the file, its target left alone)
    except OSError as e:
        raise ValueError(f"{where}: cannot inspect {path!r}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{where}: {path!r} is a directory; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{where}: {path!r} is not a regular file (a FIFO, socket or device is never replaced)")


def _lock_nb(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _create_temp(path: str) -> tuple:
    """(fd, name) of a new empty file next to ``path``, under a name nobody else holds, locked
    (``flock``) for as long as this process keeps the descriptor.

    Between creating the file and locking it, another writer's :func:`remove_dead_temps` may take
    it for a dead writer's leftover (unlocked), lock it and unlink it: so the name must still lead
    to this file once it is locked, else a new name is tried."""
    directory, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, _FLAGS, 0o666)
        except FileExistsError:  # astronomically unlikely; try another name
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner holds it: it is unlinking this name
            os.close(fd)
            continue
        except OSError:  # a file system without flock: nothing can take the file for a dead one
            return fd, tmp
        try:
            ours = os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            return fd, tmp
        os.close(fd)  # a cleaner unlinked it before the lock was taken


def remove_dead_temps(directory: str, targets: Optional[set] = None) -> List[str]:
    """Removes the temporary files of writers that died (no ``flock`` held) in ``directory``, for
    the target names in ``targets`` (all when None); returns their names."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if not m or (targets is not None and m.group(1) not in targets):
            continue
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                         | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and _lock_nb(fd):
                os.unlink(full)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


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
    """(fd, name) of a temporary file next to ``path``, removed if the block raises. Dead writers'
    temporary files for the same target are removed first."""
    directory, base = os.path.split(os.path.abspath(path))
    remove_dead_temps(directory, {base})
    fd, tmp = _create_temp(path)
    try:
        yield fd, tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _fsync_name(tmp: str, mode: int) -> None:
    """fsyncs what ``tmp`` holds now (a writer may have replaced the file under that name:
    safetensors does, as 0600), with the permissions a new file gets."""
    written = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fchmod(written, mode)
        os.fsync(written)
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


# ---------------------------------------------------------------- several files, one commit ----

def _plain(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and "\0" not in name


def _read_journal(folder: str) -> Optional[Dict[str, object]]:
    """The journal a killed update left in ``folder`` ({"files": {name: temp name}, "remove": [names]}),
    or None. One that is not exactly of that form (plain names in the folder, temporary names of
    the form this module writes) is ignored: it is never acted on."""
    try:
        with open(os.path.join(folder, JOURNAL), encoding="utf-8") as f:
            j = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    files, remove = (j.get("files"), j.get("remove")) if isinstance(j, dict) else (None, None)
    if not isinstance(files, dict) or not isinstance(remove, list):
        return None
    for name, tmp in files.items():
        m = _TEMP.match(tmp) if isinstance(tmp, str) else None
        if not _plain(name) or not _plain(tmp) or not m or m.group(1) != name:
            return None
    if not all(_plain(n) and n not in files for n in remove):
        return None
    return {"files": dict(files), "remove": list(remove)}


def folder_file(folder: str, name: str) -> Optional[str]:
    """The path that holds ``name``'s current content in ``folder`` (None: absent), reading through
    the journal of an update that was committed but not finished (its new file may still be under
    its temporary name; a file it removes is absent)."""
    j = _read_journal(folder)
    if j is not None:
        if name in j["remove"]:
            return None
        tmp = j["files"].get(name)
        if tmp is not None and os.path.isfile(os.path.join(folder, tmp)):
            return os.path.join(folder, tmp)
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def _finish(folder: str, j: Dict[str, object]) -> None:
    """Applies a committed journal (idempotent: a rename already done is skipped), then removes it."""
    for name, tmp in j["files"].items():
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(folder, tmp), os.path.join(folder, name))
    _fsync_dir(folder)
    for name in j["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    _fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, JOURNAL))
    _fsync_dir(folder)


class FolderUpdate:
    """Replaces a set of files of a folder in one commit (see the module docstring): an
    interruption at any instant (an exception, SIGKILL, power loss) leaves the old set or the new
    one, never a mix. Updates of one folder are serialised with an ``flock`` on the folder."""

    def __init__(self, folder, where: str):
        self.folder, self.where = os.fspath(folder), where
        self._temps: Dict[str, tuple] = {}  # name -> (fd, temporary path)
        self._remove: List[str] = []
        self._lock = None
        self._committed = False
        self._journal: Optional[Dict[str, object]] = None  # what _commit publishes

    def __enter__(self) -> "FolderUpdate":
        self._lock = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: updates of one folder are then the caller's to serialise
            pass
        j = _read_journal(self.folder)
        if j is not None:  # an earlier update was committed, then killed: finish it first
            _finish(self.folder, j)
        remove_dead_temps(self.folder)
        return self

    def temp_for(self, name: str) -> str:
        """A new temporary file (locked, empty) that becomes ``name`` on commit."""
        if not _plain(name) or name == JOURNAL or name in self._temps:
            raise ValueError(f"{self.where}: cannot stage {name!r}")
        fd, tmp = _create_temp(os.path.join(self.folder, name))
        self._temps[name] = (fd, tmp)
        return tmp

    def remove(self, name: str) -> None:
        """``name`` is removed once the new files are in place."""
        if _plain(name) and name not in self._temps and name not in self._remove:
            self._remove.append(name)

    def _commit(self) -> None:
        for name, (fd, tmp) in self._temps.items():
            _fsync_name(tmp, stat.S_IMODE(os.fstat(fd).st_mode))
        j = {"files": {n: os.path.basename(t) for n, (_, t) in self._temps.items()},
             "remove": [n for n in self._remove if n not in self._temps]}
        self._journal = j
        with atomic_write(os.path.join(self.folder, JOURNAL), "w", encoding="utf-8") as f:
            json.dump(j, f)  # the commit point: from here on the new set is the folder's content
        self._committed = True
        _finish(self.folder, j)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        finally:
            # Interrupted right after the journal was renamed into place, the update is committed
            # although the flag was not set yet: its files must stay.
            committed = self._committed or (self._journal is not None and
                                            _read_journal(self.folder) == self._journal)
            for fd, tmp in self._temps.values():
                os.close(fd)
                if not committed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            os.close(self._lock)
        return False
