"""One line for a build or adopt that the disk stopped: full, over quota or a size limit, read-only, not permitted."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ume_edge.errors import BuildError, UmeEdgeError

SHORT_WRITE = "short write"  # numpy's tofile and save say only "N requested and M written"
WRITE_ERRORS = {  # errno: what it means, what the user can do
    errno.ENOSPC: ("no space left on device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota"),
    errno.EFBIG: ("file too large (the file system's or `ulimit -f`'s limit)", "raise the limit"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make it writable for you"),
    errno.EPERM: ("operation not permitted", "make it writable for you"),
    SHORT_WRITE: ("a write was cut short (the disk is full or a file-size limit was reached)",
                  "free space or raise the limit"),
}
SHORT_WRITE_TEXT = re.compile(r"\d+ requested and \d+ written")
WORKER_ERRNO = re.compile(r"\[Errno (\d+)\][^'\n]*(?:'([^'\n]*)')?")  # an OSError the quantizer process sent as text


def write_failure(error: Exception, staging: Path, out: Path, retry: str) -> BuildError | None:
    """One line for a build that the disk stopped (full, over quota or a size limit, read-only, not permitted), as
    ``error`` or its causes say, or as the space left shows when they do not (a truncated file read back fails with
    a parse error); ``retry`` ends the advice. None when the failure is not about writing."""
    code, filename = _errno_in(error)
    kept = f"{out} is as it was"
    if code in WRITE_ERRORS:
        cause, remedy = WRITE_ERRORS[code]
        return BuildError(f"{cause} while writing {_where(filename, staging, out)}; {remedy} {retry}; {kept}")
    if (space := _space_short(staging)) is not None:
        free, largest = space
        return BuildError(f"{_one_line(error)}; only {free / 2**20:.1f} MiB is free where {out} is written, less than "
                          f"the largest file this build wrote ({largest / 2**20:.1f} MiB), so the disk is likely "
                          f"full: {WRITE_ERRORS[errno.ENOSPC][1]} {retry}; {kept}")
    if isinstance(error, OSError):
        return BuildError(f"{_one_line(error)} while building {out}; {kept}")
    return None


def _errno_in(error: BaseException | None) -> tuple[int | str | None, str | None]:
    """The errno (and file) of the first OSError in ``error``'s chain, also one that the quantizer process sent
    back as text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno, error.filename2 or error.filename
        if match := WORKER_ERRNO.search(str(error)):
            return int(match[1]), match[2]
        if SHORT_WRITE_TEXT.search(str(error)):
            return SHORT_WRITE, None
        error = error.__cause__ or error.__context__
    return None, None


def _where(filename, staging: Path, out: Path) -> str:
    if filename is None:  # the quantizer also writes in the temporary folder, which may be another file system
        temporary = tempfile.gettempdir()
        elsewhere = os.stat(temporary).st_dev != os.stat(staging.parent).st_dev
        return str(out) + (f" or a temporary file in {temporary}" if elsewhere else "")
    path = Path(os.fsdecode(filename))
    return f"{out} ({path.relative_to(staging)})" if path.is_relative_to(staging) else str(path)


def _space_short(staging: Path) -> tuple[int, int] | None:
    """(free bytes, largest file written) when the space left could not hold another file as large, else None."""
    try:
        free = shutil.disk_usage(staging).free
        largest = max((path.stat().st_size for path in staging.rglob("*") if path.is_file()), default=0)
    except OSError:
        return None
    return (free, largest) if free < largest else None


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, UmeEdgeError) else f"{type(error).__name__}: {text}"
