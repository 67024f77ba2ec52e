"""The exceptions the CLI turns into one `mumoe: error:` line and exit code 2.

    MumoeError         bad input of any kind (a ValueError: wrong argument, impossible budget, unsupported model)
    MumoeFileError     a file or folder that is missing, unreadable, corrupt or unwritable (also an OSError)
    MumoeDataError     data that would give a silently wrong result: NaN/inf weights, no calibration tokens,
                       non-finite scores

The API raises the same exceptions with the same messages, so `except ValueError` / `except OSError` work
as they would for the standard library.
"""

from __future__ import annotations

import errno as _errno
import os


class MumoeError(ValueError):
    """A user-facing error: bad input, unsupported model, impossible budget."""


class MumoeFileError(MumoeError, OSError):
    """A model, text, library or output location that cannot be read or written as asked."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        return self.message


class MumoeDataError(MumoeError):
    """Inputs that are well-formed but would make the result meaningless (non-finite weights or scores,
    calibration that saw no tokens)."""


def os_message(e: OSError, path: bool = True) -> str:
    """An OSError as the one line a user can act on: 'No space left on device' etc., with the path (unless
    path=False)."""
    what = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    hint = {_errno.ENOSPC: " (free space, or choose another --out)",
            _errno.EROFS: " (a read-only file system; choose another --out)",
            _errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno or 0, "")
    return f"{what}{': ' + str(e.filename) if e.filename and path else ''}{hint}"
