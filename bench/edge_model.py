"""An edge-size UME model for benchmarks: the encoders users deploy, at their size, with random weights (speed does not
depend on what the weights learned, and nothing is downloaded).

- ``image``: ResNet-18 (basic blocks 2-2-2-2, widths 64-512, BatchNorm, residual adds) over 3x112x112;
- ``text``: a 4-layer Transformer encoder (d=256, 4 heads, GELU, LayerNorm) over 64 int64 token ids, mean-pooled;
- ``audio``: a CNN over a 64-band log-mel of 3 s (1x64x300).

``python -m ume_edge.build --model bench/edge_model.py:build --calib-data <npz from calibration_data()>`` builds it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ume_edge.model import Modality, UMEModel

CLASSES = 10
IMAGE_SHAPE = (3, 112, 112)
TEXT_LENGTH, VOCAB = 64, 8000
AUDIO_SHAPE = (1, 64, 300)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs))
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, features: int = 512):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        widths = [64, 64, 128, 256, 512]
        for stage in range(4):
            layers += [BasicBlock(widths[stage], widths[stage + 1], 1 if stage == 0 else 2),
                       BasicBlock(widths[stage + 1], widths[stage + 1], 1)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(512, features)

    def forward(self, x):
        return self.project(self.features(x))


class TextEncoder(nn.Module):
    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Parameter(torch.randn(1, TEXT_LENGTH, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        return self.norm(self.encoder(self.tokens(tokens) + self.positions)).mean(dim=1)


class AudioCNN(nn.Module):
    def __init__(self, features: int = 256):
        super().__init__()
        blocks, channels = [], 1
        for width in (32, 64, 128, 256):
            blocks += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(channels, features)

    def forward(self, x):
        return self.project(self.features(x))


def build() -> UMEModel:
    torch.manual_seed(0)
    modalities = [Modality("image", ResNet18(), IMAGE_SHAPE, "float32", 512),
                  Modality("text", TextEncoder(), (TEXT_LENGTH,), "int64", 256),
                  Modality("audio", AudioCNN(), AUDIO_SHAPE, "float32", 256)]
    model = UMEModel(modalities, CLASSES, fusion="ume", name="edge")
    for module in model.modules():  # BatchNorm statistics of a trained network, not of an untrained one
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.fill_(4.0)
    return model.eval()


def calibration_data(samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the sensors' (random: the weights are random too)."""
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(0, 1, (samples, *IMAGE_SHAPE)).astype(np.float32),
            "text": rng.integers(1, VOCAB, (samples, TEXT_LENGTH)).astype(np.int64),
            "audio": rng.normal(0, 1, (samples, *AUDIO_SHAPE)).astype(np.float32)}
