"""What the conformance tests share: a small synthetic task that each model can learn in seconds (every modality
carries its own noisy view of the class: an image template, a tone, a shape in a point cloud, a grating's orientation
and frequency, class words among filler words, a point in space), so that fp32 beats chance on every presence
pattern and INT8 has something to lose; and the build, run through the command line as a user runs it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ume_edge import engine_dir
from ume_edge.constants import PROJECT_ROOT

SAMPLE_RATE = 8000


def _templates(classes: int, channels: int, size: int) -> np.ndarray:
    coarse = np.random.default_rng(1234).normal(size=(classes, channels, 4, 4))
    return np.kron(coarse, np.ones((1, 1, size // 4, size // 4)))


def image(labels, rng, classes, shape):
    channels, size, _ = shape
    x = 0.3 * _templates(classes, channels, size)[labels] + rng.normal(0, 1, (len(labels), *shape))
    return x.astype(np.float32)


def tone(labels, rng, classes, shape):
    t = np.arange(shape[-1]) / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi, (len(labels), 1))
    x = 0.22 * np.sin(2 * np.pi * 250.0 * (1 + labels[:, None]) * t + phase) + rng.normal(0, 1, (len(labels), len(t)))
    return x[:, None, :].astype(np.float32)


def points(labels, rng, classes, shape):
    count = shape[0]
    p = rng.normal(size=(len(labels), count, 3))
    sphere = p / np.linalg.norm(p, axis=2, keepdims=True)
    cube = rng.uniform(-1, 1, p.shape)
    face = rng.integers(0, 3, (len(labels), count))
    np.put_along_axis(cube, face[..., None], np.sign(rng.normal(size=(len(labels), count, 1))), axis=2)
    angle = rng.uniform(0, 2 * np.pi, (len(labels), count))
    cylinder = np.stack([np.cos(angle), np.sin(angle), rng.uniform(-1, 1, angle.shape)], axis=2)
    plane = np.concatenate([rng.uniform(-1, 1, (len(labels), count, 2)), np.zeros((len(labels), count, 1))], axis=2)
    shapes = np.stack([sphere, cube, cylinder, plane])[labels % 4, np.arange(len(labels))]
    scale = rng.uniform(0.7, 1.3, (len(labels), 1, 1))
    return (shapes * scale + rng.normal(0, 0.25, p.shape)).astype(np.float32)


def grating(labels, rng, classes, shape):
    """A grating whose orientation and frequency encode the class, at a random phase: what a depth sensor sees of a
    slatted surface."""
    _, size, _ = shape
    angle = np.pi / 4 * (labels % 4)
    frequency = np.array([2, 3, 4, 6])[labels // 4 % 4] * 2 * np.pi / size
    y, x = np.mgrid[:size, :size]
    along = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y
    phase = rng.uniform(0, 2 * np.pi, (len(labels), 1, 1))
    maps = np.sin(frequency[:, None, None] * along + phase) + rng.normal(0, 1, (len(labels), size, size))
    return maps[:, None].astype(np.float32)


def words(labels, rng, classes, shape, vocabulary=64):
    length = shape[0]
    class_words = 1 + 3 * labels[:, None] + rng.integers(0, 3, (len(labels), length))
    filler = rng.integers(1 + 3 * classes, vocabulary, (len(labels), length))
    tokens = np.where(rng.random((len(labels), length)) < 0.25, class_words, filler)
    lengths = rng.integers(length // 2, length + 1, len(labels))
    return np.where(np.arange(length) < lengths[:, None], tokens, 0).astype(np.int64)


def vector(labels, rng, classes, shape):
    centres = np.random.default_rng(99).normal(size=(classes, *shape))
    return (0.5 * centres[labels] + rng.normal(0, 1, (len(labels), *shape))).astype(np.float32)


SIGNALS = {"robot": {"camera": image, "mic": tone, "lidar": points},
           "assistant": {"camera": image, "depth": grating, "text": words},
           "outliers": {"imu": vector, "gps": vector}}


def dataset(module, rows: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``rows`` samples of every modality of the model defined in ``module``, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, module.NUM_CLASSES, rows)
    name = module.architecture().name
    inputs = {m: signal(labels, rng, module.NUM_CLASSES, module.SHAPES[m]) for m, signal in SIGNALS[name].items()}
    return inputs, labels


def train(model, inputs: dict[str, np.ndarray], labels: np.ndarray, epochs: int, seed: int = 0):
    """Each modality's encoder and head on its own partial logits (UME: every one of them must stand alone). One
    thread: the tests share two cores with other work, and oversubscribed threads made training 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, inputs, labels, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model, inputs, labels, epochs, seed):
    torch.manual_seed(seed)
    target = torch.from_numpy(labels)
    for name, x in inputs.items():
        parameters = [*model.encoders[name].parameters(), *model.heads[name].parameters()]
        optimizer = torch.optim.Adam(parameters, lr=3e-3)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(labels)).split(64):
                loss = torch.nn.functional.cross_entropy(model.partial_logits(name, torch.from_numpy(x[batch.numpy()])),
                                                         target[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def load(name: str):
    """The model file ``tests/conformance/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"conformance_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, folder: Path, out: str, *options: str) -> tuple[engine_dir.Manifest, subprocess.CompletedProcess]:
    """``python -m ume_edge.build --model tests/conformance/<name>.py:build`` from the project root, with the weights,
    calibration and evaluation data in ``folder``, into ``folder / out``."""
    command = [sys.executable, "-m", "ume_edge.build", "--model", f"tests/conformance/{name}.py:build",
               "--calib-data", str(folder / "calib.npz"), "--eval-data", str(folder / "eval.npz"),
               "--out", str(folder / out), *options]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
                            env={**os.environ, "CONFORMANCE_WEIGHTS": str(folder)})
    assert result.returncode == 0, result.stderr
    return engine_dir.load(folder / out), result
