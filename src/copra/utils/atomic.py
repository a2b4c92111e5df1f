"""Atomic writes: a file or folder is complete under its name, or not there at all.

Adapters, checkpoints, run results, experiment summaries and the report all promise that a crash
never leaves a half-written output where a finished one is expected, so they all write through
here: a hidden temporary sibling (`.<name>.tmp-<random>`), fsynced, renamed over the target in one
step, then the parent folder fsynced. A killed process leaves at most that hidden sibling
(`checkpoint.remove_leftovers` clears them on resume).

Permissions are those a plain `open()` / `mkdir()` would give: a new file 0666 and a new folder 0777
minus the umask (0644 / 0755 under the usual 022; `tempfile.mkstemp` would leave 0600), and a file
that replaces another keeps its permission bits. A full disk, a permission or read-only error, or
the folder vanishing becomes one ResourceError naming the target, with the temporary removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from copra.utils.errors import UserError, resource_error
from copra.utils.locks import check_owned


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so renames and new entries in it survive a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parent(target: Path) -> None:
    check_owned(target)  # a locked run folder deleted under us is an error, not silently re-created
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _resource(error, target.parent, "cannot create the folder") from None
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"cannot write to {target.parent}: permission denied")


def _resource(error: Exception, target: Path, action: str = "cannot write") -> Exception:
    """A resource failure (disk full, permission, read-only, folder gone) as one UserError line naming `target`."""
    return resource_error(error, target, action) or error


def _fresh(target: Path, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(path, what `create` returned) for a new hidden sibling of `target`; `create` must fail if it exists."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    Files are fsynced before the rename and the parent folder after it. A process killed at any
    point leaves `target` as it was (or, when replacing, briefly absent with the old copy in a hidden
    `.<name>.old-*` sibling) and never a partial folder under the name `target`. A full disk, a
    permission or read-only error, or the folder vanishing becomes one ResourceError naming `target`,
    with the temporary folder removed and `target` as it was.
    """
    target = Path(target)
    _make_parent(target)
    try:
        tmp, _ = _fresh(target, lambda path: os.mkdir(path, 0o777))  # the umask applies, as for mkdir
    except OSError as error:
        raise _resource(error, target) from None
    try:
        try:
            yield tmp
            _commit(tmp, target)
        except (OSError, SafetensorError) as error:
            raise _resource(error, target) from None
        check_owned(target, replaced=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path) -> None:
    """fsync the files of `tmp`, then rename it to `target` (replacing an older `target`)."""
    for path in tmp.iterdir():  # fsync files so the rename never exposes empty ones
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary sibling, fsync, rename); ResourceError naming `path`."""
    path = Path(path)
    _make_parent(path)
    tmp = None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        tmp, fd = _fresh(path, lambda name: os.open(name, flags, 0o666))  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as handle:
            _keep_mode(path, handle.fileno())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as error:
        raise _resource(error, path) from None
    finally:
        if tmp is not None:  # gone after the rename; a leftover after a failure
            tmp.unlink(missing_ok=True)
    check_owned(path)
    return path


def _keep_mode(path: Path, fd: int) -> None:
    """Give the new file the permission bits of the file it replaces (as `open(path, "w")` keeps them)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically; the body is built first, so data that cannot be written leaves nothing."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
