"""Data sets and presence patterns.

``load(name, split) -> (inputs, labels)``: ``inputs`` maps each modality name to a float32 (or int64) array whose
first axis is the sample; ``labels`` is int64. Data sets: ``avdigits`` (shipped), ``avmnist`` (MultiBench layout,
pass ``root=``), or a path to an ``.npz`` holding one array per modality and optionally ``labels``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

DATASETS = ("avdigits", "avmnist")


def load(name: str, split: str, root: str | Path | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs per modality and labels of one split of a data set (or of an ``.npz`` file, ignoring ``split``)."""
    if name == "avdigits":
        from ume_edge.data import avdigits

        if split not in avdigits.SPLITS:
            raise ValueError(f"AV-Digits has splits {', '.join(avdigits.SPLITS)}, not {split!r}")
        with np.load(avdigits.DATA_FILE) as arrays:
            return avdigits.decode(arrays, split)
    if name == "avmnist":
        if root is None:
            raise ValueError("AV-MNIST is not shipped: pass root= the folder holding image/, audio/ and *_labels.npy")
        from ume_edge.data import avmnist

        return avmnist.load(root, split)
    if name.endswith(".npz"):
        return load_npz(name)
    raise ValueError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)} or a path to an .npz file")


def load_npz(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """An ``.npz`` with one array per modality name and, when known, ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an .npz with one array per modality)")
    with np.load(path) as arrays:
        inputs = {k: arrays[k] for k in arrays.files if k != "labels"}
        labels = arrays["labels"].astype(np.int64) if "labels" in arrays.files else None
    return inputs, labels


def presence_patterns(modalities: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty subset of the modalities, each sorted, the full set first and single ones last."""
    names = sorted(modalities)
    return [combo for size in range(len(names), 0, -1) for combo in combinations(names, size)]


def pattern_key(pattern) -> str:
    """``('image', 'audio') -> 'audio+image'``: the key every report uses for a presence pattern."""
    return "+".join(sorted(pattern))


