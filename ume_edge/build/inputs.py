"""What a build reads: the model and its calibration and evaluation data, each checked so that anything wrong is one
``BuildError`` naming the file, modality or option and what to do."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.cli import missing_extra
from ume_edge.constants import REFERENCE_MODEL_NAME
from ume_edge.errors import BuildError

DEFAULT_CALIB = f"{REFERENCE_MODEL_NAME}:calib"  # the calibration split of the data set shipped in the package
MIN_CALIB_SAMPLES = 16
FEW_EVAL_SAMPLES = 200  # below this a pattern's score moves by several points from one draw of data to the next
CALIB_HINT = "give an .npz with one array per modality, named as the model's modalities, first axis the sample"


class TorchMissing(BuildError):
    """Building engines needs PyTorch (the ``build`` extra), and it is not installed."""


def require_torch(doing: str = "building engines") -> None:
    """Raise ``TorchMissing``, one line naming the extra to install, when PyTorch is not installed."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as error:
        message = missing_extra(error, doing)
        if message is None:
            raise
        raise TorchMissing(message) from None


@dataclass
class DataSet:
    """Arrays per modality (equal row counts) and labels when known, with where they came from: ``spec`` as given,
    ``source_file`` the file read (for ``NAME:SPLIT``, the shipped data set's file), to hash in the manifest."""

    spec: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source_file: Path | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_model(spec: str | None, trusted_encoders: Iterable[str] = ()):
    """The shipped reference model, a checkpoint of ``ume_edge.train``, or ``path/to/file.py:factory``. A
    checkpoint's encoders must be ume-edge's own or in ``trusted_encoders`` (``--trust-encoder``)."""
    require_torch()
    from ume_edge.model import CheckpointRefused, UMEModel, UntrustedEncoder, load_reference

    if spec is None:
        return load_reference()
    try:
        return UMEModel.load(spec, trusted_encoders)
    except UntrustedEncoder as error:
        raise BuildError(f"checkpoint {spec} names encoder {error.encoder!r}, which is not one of ume-edge's (loading "
                         f"it would import and run that code); if you wrote it and trust it, pass --trust-encoder "
                         f"{error.encoder}") from None
    except CheckpointRefused as error:
        raise BuildError(str(error)) from None
    except FileNotFoundError as error:
        raise BuildError(f"--model {error}") from None
    except SyntaxError as error:
        raise BuildError(f"--model {spec}: {error.filename}, line {error.lineno}: {error.msg}") from None
    except Exception as error:  # a user's factory or a foreign file can raise anything; name it and the cause
        kind = "the factory failed" if ".py:" in spec else "not a checkpoint written by `python -m ume_edge.train`"
        raise BuildError(f"--model {spec}: {kind} ({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: Exception, limit: int = 160) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_data(spec: str | Path, role: str) -> DataSet:
    """``NAME:SPLIT`` of a shipped data set, or an ``.npz`` with one array per modality (and ``labels``)."""
    from ume_edge.data import load

    text = str(spec)
    if ":" in text and not text.endswith(".npz") and not Path(text).exists():
        name, split = text.split(":", 1)
        try:
            return DataSet(text, *load(name, split), source_file=_shipped_file(name))
        except ValueError as error:
            raise BuildError(f"{role} data {text}: {error}") from None
    path = Path(text)
    if not path.is_file():
        raise BuildError(f"{role} data {path}: no such file; {CALIB_HINT}")
    if not zipfile.is_zipfile(path):
        hint = " (an .npy holds one array; save one per modality with np.savez)" if path.suffix == ".npy" else ""
        raise BuildError(f"{role} data {path} is not an .npz archive{hint}; {CALIB_HINT}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            inputs = {k: arrays[k] for k in arrays.files if k != "labels"}
            labels = arrays["labels"] if "labels" in arrays.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise BuildError(f"{role} data {path} cannot be read ({_first_line(error)}); {CALIB_HINT}") from None
    return DataSet(str(path), inputs, labels, source_file=path)


def _shipped_file(name: str) -> Path | None:
    from ume_edge.data import avdigits

    return avdigits.DATA_FILE if name == "avdigits" else None


def check_data(model, data: DataSet, role: str) -> DataSet:
    """The model's modalities from ``data``, each the right shape and dtype, finite, with equal row counts."""
    checked = {m.name: _checked_array(m, data, role) for m in model.modalities}
    rows = {name: len(x) for name, x in checked.items()}
    if len(set(rows.values())) != 1:
        raise BuildError(f"{role} data {data.spec}: the modalities have different numbers of rows {rows}; every row "
                         "must hold all modalities (one sample each)")
    count = next(iter(rows.values()))
    if count == 0:
        raise BuildError(f"{role} data {data.spec} has no rows; give at least {MIN_CALIB_SAMPLES} samples")
    return DataSet(data.spec, checked, _checked_labels(model, data, role, count), data.source_file)


def _checked_array(modality, data: DataSet, role: str) -> np.ndarray:
    name, path = modality.name, data.spec
    if name not in data.inputs:
        raise BuildError(f"modality {name!r}: no array named {name!r} in the {role} data {path} "
                         f"(it has {', '.join(data.inputs) or 'nothing'})")
    x = data.inputs[name]
    if x.ndim < 1 or tuple(x.shape[1:]) != modality.input_shape:
        raise BuildError(f"modality {name!r}: {role} data {path} has shape {list(x.shape)}, expected "
                         f"[N, {', '.join(map(str, modality.input_shape))}]")
    if x.dtype != np.dtype(modality.dtype):
        if not (modality.dtype == "float32" and np.issubdtype(x.dtype, np.floating)):
            raise BuildError(f"modality {name!r}: {role} data {path} has dtype {x.dtype}, expected {modality.dtype}")
        x = x.astype(np.float32)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise BuildError(f"modality {name!r}: {role} data {path} has NaN or Inf in {len(bad)} row(s) (first: "
                         f"{bad[:5].tolist()}); clean or drop those rows")
    return np.ascontiguousarray(x)


def _checked_labels(model, data: DataSet, role: str, rows: int) -> np.ndarray | None:
    labels = data.labels
    if labels is None:
        return None
    if labels.ndim != 1 or len(labels) != rows:
        raise BuildError(f"{role} data {data.spec}: `labels` has shape {list(labels.shape)}, expected [{rows}] (one "
                         "class index per row)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BuildError(f"{role} data {data.spec}: `labels` are {labels.dtype}; give integer class indices")
    outside = np.flatnonzero((labels < 0) | (labels >= model.num_classes))
    if len(outside):
        raise BuildError(f"{role} data {data.spec}: {len(outside)} label(s) outside 0..{model.num_classes - 1} (first "
                         f"row {outside[0]}: {labels[outside[0]]}); the model has {model.num_classes} classes")
    return labels.astype(np.int64)


def calibration_spec(calib_data: str | None) -> str:
    return calib_data or DEFAULT_CALIB


def evaluation_spec(model, eval_data: str | None, calib_data: str | None) -> str:
    """A model trained on AV-Digits is checked on its validation split; another model on its calibration data."""
    if eval_data:
        return eval_data
    if model.name == REFERENCE_MODEL_NAME:
        return f"{REFERENCE_MODEL_NAME}:val"
    return calibration_spec(calib_data)


def check_calibration_size(data: DataSet, precision: str) -> None:
    if precision == "int8" and data.rows < MIN_CALIB_SAMPLES:
        raise BuildError(f"calibration data {data.spec} has {data.rows} sample(s); INT8 ranges need at least "
                         f"{MIN_CALIB_SAMPLES} (200-1,000 typical). Give more, or build --precision fp32")
