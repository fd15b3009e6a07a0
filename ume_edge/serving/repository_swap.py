"""Writing a set of model folders (and scripts) into a Triton model repository without ever losing one: what is in the
way and was not written by ume-edge is refused before anything is written, the new set is built in a staging folder
and swapped in as a whole, a run that fails puts everything back, and one that was killed is rolled back by the next.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ume_edge import engine_dir
from ume_edge.errors import UmeEdgeError

LOGGER = logging.getLogger(__name__)

WRITTEN_BY = "# Written by python -m ume_edge.triton_repo; the next run replaces this model folder."
SCRIPT_WRITTEN_BY = "Written by ume-edge"  # in the first lines of each target build script


class RepositoryError(UmeEdgeError):
    """A repository that cannot be written, or served, as asked; the message says why and what to do."""


# The new models are built in a staging folder beside ``out`` (inside it where ``out`` is a mount point: a rename
# cannot cross file systems). Before the first swap the staging folder gets a journal of the new entries' inode
# numbers; each entry then takes its place in one renameat2(RENAME_EXCHANGE), the old one moving into the staging
# folder. A run that fails while swapping swaps everything back; one that was killed is swapped back by the next
# run (``recover_interrupted``) before it decides anything. Once all are in, ``done`` marks the staging folder as
# leftovers only.

_STAGING_INFIX = ".ume-repo-"
_NEW, _OLD, _DISCARDED = "new", "old", "discarded"
_JOURNAL, _DONE = "journal.json", "done"


def prepare_out(out: Path, names: list[str]) -> None:
    """Before anything is written: refuse a bad ``out``, undo what killed runs left, and refuse ``names`` in ``out``
    that ume-edge did not write."""
    check_out(out)
    _cannot_write(out, recover_interrupted, out)
    _refuse_foreign(out, names)


def write_and_swap_in(out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """``write`` fills an empty staging folder and returns the names of what it wrote there; those are swapped into
    ``out`` as a whole (or, on any failure, not at all). Returns the names."""
    staging = _cannot_write(out, _make_staging, out)
    try:
        names = write(staging / _NEW)
        _refuse_foreign(out, names)  # the scripts too, and whatever appeared meanwhile
        _swap_in(staging, out, names)
    except OSError as error:
        raise RepositoryError(f"cannot write the repository {out}: {error.strerror} ({error.filename}); it was left "
                              "as it was") from error
    finally:
        _cannot_write(out, _close_staging, staging, out)
    return names


def check_out(out: Path) -> None:
    """Refuse, with one line, an ``out`` that is a file, lies under one, or is on a file system that cannot be
    written; before any long work."""
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} is a file, not a folder; it was left untouched. Choose another path")
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RepositoryError(f"--out {out}: {existing} is a file, not a folder; choose another path")
    if existing is not None and not os.access(existing, os.W_OK):
        raise RepositoryError(f"--out {out}: {existing} cannot be written (read-only file system or no permission); "
                              "choose a folder you can write to")


def _cannot_write(out: Path, step, *args):
    """``step(*args)``, its OSError as one line."""
    try:
        return step(*args)
    except OSError as error:
        raise RepositoryError(f"--out {out}: cannot write {error.filename} ({error.strerror}); choose a folder you can "
                              "write to, or run the same command again once it is writable") from error


def _is_ours(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        config = path / "config.pbtxt"
        return config.is_file() and config.read_text(errors="replace").startswith(WRITTEN_BY)
    if not path.is_file():
        return False
    with path.open(errors="replace") as file:
        return SCRIPT_WRITTEN_BY in file.read(1000)


def _refuse_foreign(out: Path, names: list[str]) -> None:
    foreign = [str(out / name) for name in names if _inode(out / name) is not None and not _is_ours(out / name)]
    if len(foreign) == 1:
        raise RepositoryError(f"{foreign[0]} exists and was not written by ume-edge; nothing was written. Choose "
                              "another --out, or move it away")
    if foreign:
        raise RepositoryError(f"{', '.join(foreign)} exist and were not written by ume-edge; nothing was written. "
                              "Choose another --out, or move them away")


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _staging_parent(out: Path) -> Path:
    real = out.resolve()
    if real.is_dir() and real.stat().st_dev != real.parent.stat().st_dev:
        return real
    return real.parent


def _staging_prefix(out: Path) -> str:
    return f".{out.resolve().name}{_STAGING_INFIX}"


def _make_staging(out: Path) -> Path:
    parent = _staging_parent(out)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
    (staging / engine_dir.STAGING_MARKER).touch()
    (staging / _NEW).mkdir()
    return staging


def _replace(source: Path, target: Path, aside: Path) -> None:
    """``source`` to ``target`` in one step; what was at ``target`` goes to ``aside``."""
    if _inode(target) is None:
        os.rename(source, target)
        return
    aside.parent.mkdir(exist_ok=True)
    if engine_dir.exchange(source, target):
        os.rename(source, aside)
    else:  # no atomic swap on this file system
        os.rename(target, aside)
        os.rename(source, target)


def _swap_in(staging: Path, out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    journal = staging / _JOURNAL
    journal.with_suffix(".tmp").write_text(json.dumps({name: _inode(staging / _NEW / name) for name in names}))
    os.replace(journal.with_suffix(".tmp"), journal)
    for name in names:
        _replace(staging / _NEW / name, out / name, staging / _OLD / name)
    (staging / _DONE).touch()


def _roll_back(staging: Path, out: Path) -> bool:
    """Put back every old entry that a run which did not finish had swapped out; whether it had begun swapping."""
    journal = staging / _JOURNAL
    if (staging / _DONE).exists() or not journal.exists():
        return False
    for name, inode in json.loads(journal.read_text()).items():
        old = next((p for p in (staging / _NEW / name, staging / _OLD / name) if _inode(p) not in (None, inode)), None)
        target = out / name
        if _inode(target) == inode:
            if old is None:  # there was none
                (staging / _DISCARDED).mkdir(exist_ok=True)
                os.rename(target, staging / _DISCARDED / name)
            else:
                _replace(old, target, staging / _DISCARDED / name)
        elif old is not None and _inode(target) is None:
            os.rename(old, target)
    journal.unlink()
    return True


def _close_staging(staging: Path, out: Path) -> None:
    """Roll back what an unfinished run swapped in, then remove its staging folder: the journal first (so a kill
    halfway never rolls back from half-removed old models), the marker last (so the next run recognises the rest)."""
    if _roll_back(staging, out):
        LOGGER.warning("put back the models of %s that an unfinished run had replaced", out)
    (staging / _JOURNAL).unlink(missing_ok=True)
    for child in staging.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name != engine_dir.STAGING_MARKER:
            child.unlink()
    (staging / engine_dir.STAGING_MARKER).unlink(missing_ok=True)
    staging.rmdir()


def recover_interrupted(out: Path) -> None:
    """Undo what runs into ``out`` that were killed while swapping had done, and remove what they left."""
    parent, prefix = _staging_parent(out), _staging_prefix(out)
    if not parent.is_dir():
        return
    for staging in sorted(parent.glob(f"{prefix}*")):
        pid = staging.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or engine_dir.pid_alive(int(pid)) or not staging.is_dir():
            continue
        if (staging / engine_dir.STAGING_MARKER).is_file() or not any(staging.iterdir()):
            _close_staging(staging, out)
            LOGGER.info("removed %s, left by a run that was killed", staging)
