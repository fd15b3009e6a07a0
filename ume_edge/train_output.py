"""Writing what ``python -m ume_edge.train`` produces without losing the files it replaces: the checkpoint and report
paths are checked before training, and both files are written beside their final names and renamed over the old ones
both or neither.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from ume_edge.errors import UmeEdgeError
from ume_edge.model import UMEModel


class NotWritten(UmeEdgeError):
    """The checkpoint or its report could not be written; the previous ones are as they were."""


def check_writable(path: Path) -> None:
    """Raise ``UmeEdgeError`` unless a file can be written at ``path`` (its folder exists or can be created)."""
    try:
        problem = _why_not_writable(path)
    except OSError as error:
        problem = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
    if problem:
        raise UmeEdgeError(f"cannot write {path}: {problem}")


def _why_not_writable(path: Path) -> str | None:
    if path.is_dir():
        return f"it is a folder; give a file name, such as {path / 'model.pt'}"
    folder = path.parent
    existing = next(ancestor for ancestor in (folder, *folder.parents) if ancestor.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing != folder:  # try creating the first missing folder (and remove it again)
        first_missing = next(ancestor for ancestor in (folder, *folder.parents) if ancestor.parent == existing)
        first_missing.mkdir()
        first_missing.rmdir()
        return None
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
        return None


def write_checkpoint_and_report(model: UMEModel, report: dict, out: Path, report_path: Path) -> None:
    """Write both to temporary files next to them and rename them over the old ones only once both are complete.
    On any failure (``NotWritten``) or interruption the old files are untouched and the temporaries removed."""
    staged = {final: final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial") for final in (out, report_path)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(staged[out], report)
        staged[report_path].write_text(json.dumps(report, indent=2) + "\n")
        with _sigint_ignored():
            for final, temporary in staged.items():  # the report last
                os.replace(temporary, final)
    except OSError as error:
        raise NotWritten(f"could not write {out} and {report_path} ({error.strerror or error}); "
                         "both are as they were") from None
    except RuntimeError as error:  # how torch.save reports a failed write, without the cause
        raise NotWritten(f"could not write {out}: saving stopped part-way, most likely on a full disk or a file-size "
                         f"limit ({str(error).splitlines()[0]}); {out} and {report_path} are as they were") from None
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


@contextmanager
def _sigint_ignored():
    """Ctrl-C is ignored inside, so that the checkpoint and the report are renamed both or neither."""
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

