"""Replacing ``--out`` safely: what may be replaced, the hidden staging folder a build writes into, and the publish
that puts it in place (``staged`` is the whole transaction)."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ume_edge.engine_dir.schema import MANIFEST_FILE, STAGING_MARKER, parse_manifest
from ume_edge.errors import BuildError, EngineMismatch

LOGGER = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _own_declared_files(directory: Path) -> set[str] | None:
    """The files an ume-edge manifest in ``directory`` declares (any schema version), or None when it has none."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not {"schema_version", "modalities", "fusion", "backend"} <= set(data):
        return None
    try:
        return parse_manifest(data).declared_files()
    except EngineMismatch:
        return _declared_by_older_schema(data)


def _declared_by_older_schema(data: dict) -> set[str]:
    """Schema 1 kept one ``file`` per entry and TensorRT files under ``tensorrt/``."""
    files = {MANIFEST_FILE, STAGING_MARKER, "tensorrt/fusion.onnx"}
    for entry in [*data.get("modalities", []), data.get("fusion", {})]:
        if isinstance(entry, dict):
            files.update(v for k, v in entry.items() if k in ("file", "tensorrt_onnx") and isinstance(v, str))
            if isinstance(entry.get("name"), str):
                files.update({f"tensorrt/{entry['name']}.onnx", f"tensorrt/{entry['name']}.calibration.json"})
    return files


def _unknown_entries(directory: Path, known: set[str]) -> list[str]:
    unknown = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or (path.is_file() and relative not in known):
            unknown.append(relative)
        elif path.is_dir() and not any(k.startswith(relative + "/") for k in known):
            unknown.append(relative + "/")
    return unknown


def check_replaceable(out: Path) -> None:
    """Refuse, with one line, an ``--out`` whose replacement could lose a file that ume-edge did not write."""
    if out.is_symlink():
        raise BuildError(f"--out {out} is a symbolic link; give the folder it points to, or another path")
    if not out.exists():
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise BuildError(f"--out {out}: {parent} is a file, not a folder; choose another path")
        return
    if not out.is_dir():
        raise BuildError(f"--out {out} is an existing file, not an engine directory; it was left untouched. "
                         "Choose another path")
    if not any(out.iterdir()):
        return
    declared = _own_declared_files(out)
    if declared is None:
        raise BuildError(f"--out {out} exists and is not an engine directory written by ume-edge (no ume-edge "
                         "manifest.json); it was left untouched. Choose another path, or remove it yourself")
    unknown = _unknown_entries(out, declared)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise BuildError(f"--out {out} is an engine directory but also holds files a build did not write ({shown}); "
                         "it was left untouched. Move them out, or choose another path")


# ---------------------------------------------------------------------------------------------------------------
# staging and publishing


def make_staging(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` to build into (same file system, so it can be renamed into place)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out.parent)
        return _marked_folder(out)
    except OSError as error:
        raise BuildError(f"--out {out}: cannot write in {out.parent} ({error.strerror}); choose a folder you can "
                         "write to") from error


def _marked_folder(out: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    (folder / STAGING_MARKER).touch()
    return folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent: Path) -> None:
    """Clean up after builds that were killed (their process is gone): a complete build whose ``--out`` is missing
    is put back in place, any other staging folder is removed."""
    for candidate in sorted(parent.glob(".*.tmp-*-*")):
        name, _, rest = candidate.name[1:].rpartition(".tmp-")
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)) or not candidate.is_dir():
            continue
        if not (candidate / STAGING_MARKER).is_file() and any(candidate.iterdir()):
            continue  # not ours
        out = parent / name
        if not out.exists() and _own_declared_files(candidate) is not None:
            (candidate / STAGING_MARKER).unlink()
            os.rename(candidate, out)
            LOGGER.warning("restored %s, which a killed build had moved aside", out)
            continue
        _remove_staging(candidate)
        LOGGER.info("removed %s, left by a build that was killed", candidate)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder (marked, complete) at ``out``; an old build there is replaced only now.

    The old build is marked as staging before the swap, so whatever instant a kill comes, the next build finds
    either a complete ``out`` and removable leftovers, or a complete build to put back at ``out``."""
    check_replaceable(out)
    if not out.exists():
        os.rename(staging, out)
        (out / STAGING_MARKER).unlink()
        return
    (out / STAGING_MARKER).touch()
    if exchange(staging, out):
        old = staging
    else:  # no atomic swap on this system: the old build moves aside, then the new one takes its place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.rename(out, old)
        os.rename(staging, out)
    (out / STAGING_MARKER).unlink()
    _remove_staging(old)


def _remove_staging(folder: Path) -> None:
    """Remove a staging folder, its marker last, so a kill halfway leaves it recognisable (or empty)."""
    for child in folder.iterdir():
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def discard(staging: Path) -> None:
    """Remove a staging folder after a failed or interrupted build."""
    if staging.exists():
        _remove_staging(staging)


class InterruptedAfterPublish(KeyboardInterrupt):
    """Ctrl-C came while a finished build was being published; it was held back until ``out`` held the new build."""

    def __init__(self, out: Path):
        super().__init__(str(out))
        self.out = out


def publish_holding_interrupt(staging: Path, out: Path) -> None:
    """``publish`` with Ctrl-C held back until it is done, so that an interrupt never leaves the caller unsure
    whether ``out`` is the old build or the new one: one that came raises ``InterruptedAfterPublish``."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        publish(staging, out)
        return
    held = []
    signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        publish(staging, out)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise InterruptedAfterPublish(out)


@contextmanager
def staged(out: Path, explain: Callable[[Exception, Path], Exception | None] | None = None) -> Iterator[Path]:
    """The transaction that writes ``out``: a fresh staging folder to fill, published (Ctrl-C held) when the block
    ends, discarded when it raises. ``explain(error, staging)`` may turn a failure into a clearer error; it sees the
    staging folder before it is removed."""
    check_replaceable(out)
    staging = make_staging(out)
    try:
        yield staging
        publish_holding_interrupt(staging, out)
    except Exception as error:
        clearer = explain(error, staging) if explain is not None else None
        discard(staging)
        if clearer is None:
            raise
        raise clearer from None
    except BaseException:
        discard(staging)
        raise
