"""One owner per output folder: an exclusive OS lock that dies with its process.

Why: two commands writing one run folder (two `copra train` with the same output_dir, a `copra report`
inside a running suite) each pass their "is the folder fresh?" checks before the other has written, then
overwrite each other's files. Every command that writes a run, experiment, suite or adapter folder
holds `folder_lock(folder)` for its whole life; a second process is refused at once (`FolderInUse`, a
UserError: one line naming the folder and the holder, exit 2, nothing written).

How: `fcntl.flock(LOCK_EX | LOCK_NB)` on a hidden file beside the folder, `<parent>/.<name>.copra-lock`.
The kernel drops a flock when its process dies (even by SIGKILL), so `--resume` needs no clean-up;
a stale file left by a killed process is simply locked again. Beside, not inside, because an adapter
folder is replaced by a rename (`adapters.atomic_folder`) and must hold only PEFT's files, and a run
folder must look empty to `check_fresh_output`. The holder writes its PID, host and start time into
the file so the refused process can name it. On release the file is unlinked before it is unlocked;
a process that opened the old file meanwhile notices the path now names another inode and retries.

Within one process the lock is re-entrant (the CLI and `train` both take the run folder's lock). Only
rank 0 of a distributed launch (`RANK`/`WORLD_SIZE` from torchrun / accelerate) locks: the other ranks
write nothing. `--jobs` workers lock their own run folders, never the parent's results folder, so a
parent holding a suite's lock cannot block its own workers. POSIX only (flock).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from copra.utils.errors import ResourceError, UserError, resource_error

LOCK_SUFFIX = ".copra-lock"
_guard = threading.Lock()


@dataclass
class _Held:
    """A lock this process holds: its fd, nesting depth, folder and the folder's (st_dev, st_ino) once seen."""

    fd: int
    depth: int
    folder: Path
    ident: tuple[int, int] | None
    created: list[Path]  # parent folders made for the lock file, removed on release if still empty


_held: dict[Path, _Held] = {}  # lock file -> what this process holds


class FolderInUse(UserError):
    """Another live process holds the output folder's lock (the message names the folder and the holder)."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: `<parent>/.<name>.copra-lock` (inside it for a file-system root)."""
    folder = Path(folder).resolve()
    if folder.parent == folder:
        return folder / LOCK_SUFFIX
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def holder(folder: str | Path) -> dict | None:
    """What the current holder wrote into the lock file ({pid, host, started, command}), or None."""
    try:
        return _parse(lock_path(folder).read_text(encoding="utf-8"))
    except OSError:
        return None


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder`'s exclusive lock for the block; FolderInUse at once if another process holds it."""
    if _secondary_rank():
        yield Path(folder)
        return
    path = lock_path(folder)
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry.depth += 1
        else:
            fd, created = _acquire_with_parents(path, Path(folder))
            _held[path] = _Held(fd, 1, Path(folder).resolve(), _ident(Path(folder)), created)
    try:
        yield Path(folder)
    finally:
        with _guard:
            entry = _held[path]
            entry.depth -= 1
            if entry.depth == 0:
                del _held[path]
                _release(path, entry.fd)
                _remove_empty(entry.created)


def locks_output(function: Callable) -> Callable:
    """Decorator: `function(..., output=folder)` runs holding `folder`'s lock."""

    @functools.wraps(function)
    def locked(*args, output, **kwargs):
        with folder_lock(output):
            return function(*args, output=output, **kwargs)

    return locked


def check_owned(target: str | Path, replaced: bool = False) -> None:
    """ResourceError if a locked folder holding `target` was deleted or replaced under this process.

    Atomic writers call it before and after each write. A locked folder first seen missing is
    recorded once it exists; `replaced=True` after a write that renamed `target` itself into place
    (an adapter folder) records the new folder instead of objecting to it.
    """
    if not _held:
        return
    target = Path(target).resolve()
    with _guard:
        for entry in _held.values():
            if entry.folder != target and entry.folder not in target.parents:
                continue
            now = _ident(entry.folder)
            if entry.ident is not None and now != entry.ident and not (replaced and entry.folder == target):
                raise ResourceError(
                    f"{entry.folder} was deleted or replaced while this process was writing to it; "
                    "nothing more is written there"
                )
            entry.ident = now if now is not None else entry.ident


def _ident(folder: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def _acquire_with_parents(path: Path, folder: Path) -> tuple[int, list[Path]]:
    """`_acquire`, creating the lock file's missing parent folders (again, if a releasing process removed them)."""
    for _ in range(3):
        try:
            created = _make_parents(path.parent)
        except OSError as error:
            raise _cannot_lock(folder, error) from None
        try:
            return _acquire(path, folder), created
        except FileNotFoundError as error:
            _remove_empty(created)
            missing = error
        except BaseException:
            _remove_empty(created)
            raise
    raise _cannot_lock(folder, missing)


def _acquire(path: Path, folder: Path) -> int:
    """An fd of `path` holding LOCK_EX, with this process's holder record written into it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            raise  # the parent folder vanished: the caller makes it again
        except OSError as error:
            raise _cannot_lock(folder, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by another copra process ({_describe(info)}); "
                "wait for it to finish or stop it, then run again"
            ) from None
        except OSError as error:  # e.g. ENOLCK on a file system without locks
            os.close(fd)
            raise _cannot_lock(folder, error) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder unlinked it between our open and our lock: lock the new file
    try:
        _write_holder(fd)
    except OSError as error:
        _release(path, fd)
        raise _cannot_lock(folder, error) from None
    return fd


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink()  # before unlocking: a waiter that opened this inode sees it is gone and retries
    except OSError:
        pass
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _write_holder(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv)[:300],
    }
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> dict | None:
    for _ in range(20):  # the holder may be between its truncate and its write
        try:
            info = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        except OSError:
            return None
        if info is not None:
            return info
        time.sleep(0.005)
    return None


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if info is None:
        return "holder unknown"
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def _cannot_lock(folder: Path, error: OSError) -> UserError:
    converted = resource_error(error, error.filename or lock_path(folder), action=f"cannot lock {folder}:")
    if converted is not None:
        return converted
    return UserError(f"cannot lock {folder}: {error.strerror or error} (does this file system support flock?)")


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, deepest first (removed if refused)."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError:
            _remove_empty(missing)
            raise
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            break


def _secondary_rank() -> bool:
    """True in the non-zero ranks of a torchrun / accelerate launch (only rank 0 writes)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


__all__ = ["LOCK_SUFFIX", "FolderInUse", "check_owned", "folder_lock", "holder", "lock_path", "locks_output"]
