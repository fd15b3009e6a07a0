"""The data set the client replays, checked before anything is sent."""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ume_edge.data import load, load_npz

LOGGER = logging.getLogger(__name__)


def read_data_set(dataset: str, split: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The inputs and labels to replay, checked: one line naming the data set and the problem otherwise."""
    inputs, labels = _read_npz(Path(dataset)) if dataset.endswith(".npz") else load(dataset, split)
    samples = _count_samples(dataset, inputs)
    if labels is not None and len(labels) != samples:
        raise ValueError(f"{dataset}: {samples} samples but {len(labels)} labels; give one label per sample")
    return {name: _as_float32(dataset, name, array) for name, array in inputs.items()}, labels


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        return load_npz(path)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: not a readable .npz ({error}); is the file truncated or corrupt?") from None


def _count_samples(dataset: str, inputs: dict[str, np.ndarray]) -> int:
    """The number of samples every modality has; refused when they differ or there are none."""
    if not inputs:
        raise ValueError(f"{dataset}: no input arrays (only labels); save one array per modality")
    rows = {name: len(array) if array.ndim else 0 for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise ValueError(f"{dataset}: the modalities have different numbers of samples ({counts})")
    if not any(rows.values()):
        raise ValueError(f"{dataset}: 0 samples; nothing to replay")
    return next(iter(rows.values()))


def _as_float32(dataset: str, name: str, array: np.ndarray) -> np.ndarray:
    """float64 (numpy's default) rounded to the float32 the model computes in; refused if it would overflow."""
    if array.dtype != np.float64:
        return array
    finite = np.abs(array[np.isfinite(array)])
    if finite.size and finite.max() > np.finfo(np.float32).max:
        raise ValueError(f"{dataset}: {name} is float64 with values beyond float32's range (the model takes "
                         f"float32); scale the data before saving it")
    LOGGER.warning("%s: %s is float64; sending it as float32, which the model takes", dataset, name)
    return array.astype(np.float32)
