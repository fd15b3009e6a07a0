"""The engine directory: where a build's output goes, and how it replaces an older build without losing anything.

A build writes into a hidden staging folder beside ``--out`` and only then puts it in place. ``--out`` is replaced
only when it is absent, empty, or an engine directory that ume-edge wrote (nothing in it but the files its manifest
lists); anything else is refused and left untouched. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``, so at
every instant ``--out`` is either the complete old build or the complete new one. Staging folders left by killed
builds are removed by the next build into the same parent folder.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ume_edge.errors import BuildError

LOGGER = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
STAGING_MARKER = ".ume-edge-staging"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


# ---------------------------------------------------------------------------------------------------------------
# what may be replaced


def written_files(directory: Path, manifest: dict) -> set[str]:
    """Every file (relative path) a build of ``manifest`` wrote into ``directory``, the manifest included."""
    files = {MANIFEST_FILE, STAGING_MARKER}
    for modality in manifest.get("modalities", []):
        files.add(modality.get("file"))
        files.add(modality.get("tensorrt_onnx"))
        files.add(f"tensorrt/{modality.get('name')}.calibration.json")
        files.add(f"tensorrt/{modality.get('name')}.onnx")
    fusion = manifest.get("fusion", {})
    files.update((fusion.get("file"), fusion.get("tensorrt_onnx"), "tensorrt/fusion.onnx"))
    files.update(manifest.get("files", []))
    return {f for f in files if isinstance(f, str)}


def _read_own_manifest(directory: Path) -> dict | None:
    """The manifest of an engine directory ume-edge wrote, or None when ``directory`` is not one."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        return None
    if not {"modalities", "fusion", "backend"} <= set(manifest):
        return None
    return manifest


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
    manifest = _read_own_manifest(out)
    if manifest is None:
        raise BuildError(f"--out {out} exists and is not an engine directory written by ume-edge (no ume-edge "
                         "manifest.json); it was left untouched. Choose another path, or remove it yourself")
    unknown = _unknown_entries(out, written_files(out, manifest))
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


def _pid_alive(pid: int) -> bool:
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
        if not pid.isdigit() or _pid_alive(int(pid)) or not candidate.is_dir():
            continue
        if not (candidate / STAGING_MARKER).is_file() and any(candidate.iterdir()):
            continue  # not ours
        out = parent / name
        if not out.exists() and _read_own_manifest(candidate) is not None:
            (candidate / STAGING_MARKER).unlink()
            os.rename(candidate, out)
            LOGGER.warning("restored %s, which a killed build had moved aside", out)
            continue
        _remove_staging(candidate)
        LOGGER.info("removed %s, left by a build that was killed", candidate)


def _exchange(a: Path, b: Path) -> bool:
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
    if _exchange(staging, out):
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
