"""Errors a user can fix (bad config, missing file, wrong name, a full disk): one line each, never a traceback.

The CLI prints a UserError as a single line and exits with code 2; anything else is a bug and keeps
its traceback. Resource failures (disk full, no permission, read-only file system, a folder deleted
under a running job) are not bugs either: `resource_error` turns them into a `ResourceError` line
naming the path and the cause.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(ValueError):
    """A problem with the user's input: the message names the offending value, key or file."""


class ResourceError(UserError):
    """The machine refused a write (space, permission, read-only, folder gone); the message names the path."""


# errno -> a hint; anything else stays a bug with its traceback
RESOURCE_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space or raise the quota",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
    errno.EROFS: "choose a writable output folder",
    errno.ENOENT: "was the folder deleted or moved while in use?",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "the device reported an I/O error",
}
# Rust's io::Error, as safetensors reports it: "... No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def error_code(error: BaseException) -> int | None:
    """The errno behind an OSError, or behind a library error that carries one in its text (safetensors)."""
    if isinstance(error, OSError):
        return error.errno
    match = _RUST_OS_ERROR.search(str(error))
    return int(match.group(1)) if match else None


def resource_error(error: BaseException, path=None, action: str = "cannot write") -> ResourceError | None:
    """`error` as one line "<action> <path>: <cause> (<ERRNO>); <hint>", or None if it is no resource error."""
    code = error_code(error)
    if code not in RESOURCE_ERRNOS:
        return None
    where = path if path is not None else getattr(error, "filename", None)
    subject = f"{action} {where}" if where is not None else action
    name = errno.errorcode.get(code, str(code))
    return ResourceError(f"{subject}: {os.strerror(code)} ({name}); {RESOURCE_ERRNOS[code]}")
