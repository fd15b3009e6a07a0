"""A robot's perception model, written as a user would: a ResNet-style camera encoder, a 1-D convolutional encoder over
raw microphone waveforms and a PointNet-style lidar encoder, fused late (UME).

``python -m ume_edge.build --model tests/conformance/robot.py:build`` loads the weights from
``$CONFORMANCE_WEIGHTS/robot.pt`` (the conformance tests train them).
"""

import os
from pathlib import Path

import torch
from torch import nn

from ume_edge.model import Modality, UMEModel

NUM_CLASSES = 4
SHAPES = {"camera": (3, 16, 16), "mic": (1, 4000), "lidar": (128, 3)}
FEATURES = 64


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual add; a strided 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, FEATURES, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.stages(self.stem(x))).flatten(1)


class WaveformEncoder(nn.Module):
    """Strided 1-D convolutions straight over the samples (no spectrogram), then global average pooling."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width, kernel, stride in ((16, 64, 8), (32, 9, 4), (FEATURES, 9, 4)):
            layers += [nn.Conv1d(channels, width, kernel, stride, kernel // 2), nn.BatchNorm1d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x).mean(dim=2)


class PointNetEncoder(nn.Module):
    """A shared MLP over every point (1x1 convolutions) and a max-pool over the points: order does not matter."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32), nn.ReLU(),
                                    nn.Conv1d(32, 128, 1), nn.BatchNorm1d(128), nn.ReLU())
        self.project = nn.Sequential(nn.Linear(128, FEATURES), nn.ReLU())

    def forward(self, points):
        return self.project(self.shared(points.transpose(1, 2)).max(dim=2).values)


ENCODERS = {"camera": ResNetEncoder, "mic": WaveformEncoder, "lidar": PointNetEncoder}


def architecture() -> UMEModel:
    torch.manual_seed(0)
    modalities = [Modality(name, ENCODERS[name](), shape, "float32", FEATURES) for name, shape in SHAPES.items()]
    return UMEModel(modalities, NUM_CLASSES, name="robot")


def build() -> UMEModel:
    model = architecture()
    model.load_state_dict(torch.load(Path(os.environ["CONFORMANCE_WEIGHTS"]) / "robot.pt", weights_only=True))
    return model
