"""AV-MNIST in the layout MultiBench distributes.

::

    root/image/train_data.npy   root/image/test_data.npy    (N, 28, 28) or (N, 784) grey images
    root/audio/train_data.npy   root/audio/test_data.npy    (N, 112, 112) spectrograms
    root/train_labels.npy       root/test_labels.npy        (N,) digit labels

MultiBench has no validation split: ``val`` is the last ``VAL_FRACTION`` of ``train`` (and ``train`` the rest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VAL_FRACTION = 0.1


def _read(root: Path, file_split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    paths = {"image": root / "image" / f"{file_split}_data.npy", "audio": root / "audio" / f"{file_split}_data.npy"}
    labels_path = root / f"{file_split}_labels.npy"
    missing = [str(p) for p in [*paths.values(), labels_path] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"AV-MNIST files missing under {root}: {', '.join(missing)}")
    image = np.load(paths["image"]).astype(np.float32)
    audio = np.load(paths["audio"]).astype(np.float32)
    labels = np.load(labels_path).astype(np.int64)
    image = image.reshape(len(image), 1, 28, 28)
    if image.max() > 1.0:
        image = image / 255.0
    audio = audio.reshape(len(audio), 1, *audio.shape[-2:])
    if not len(image) == len(audio) == len(labels):
        raise ValueError(f"AV-MNIST {file_split}: {len(image)} images, {len(audio)} audio, {len(labels)} labels")
    return {"audio": audio, "image": image}, labels


def load(root: str | Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    root = Path(root)
    if split == "test":
        return _read(root, "test")
    if split not in ("train", "val", "calib"):
        raise ValueError(f"AV-MNIST has splits train, val, calib (a slice of val) and test, not {split!r}")
    inputs, labels = _read(root, "train")
    cut = int(len(labels) * (1 - VAL_FRACTION))
    part = slice(None, cut) if split == "train" else slice(cut, None)
    return {k: v[part] for k, v in inputs.items()}, labels[part]
