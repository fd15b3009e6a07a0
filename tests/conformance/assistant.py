"""A home assistant's model, written as a user would: a MobileNet-style camera encoder, a depth encoder of
convolutions with BatchNorm, GELU and LayerNorm, and a Transformer over int64 text tokens, fused late (UME).

``python -m ume_edge.build --model tests/conformance/assistant.py:build`` loads the weights from
``$CONFORMANCE_WEIGHTS/assistant.pt`` (the conformance tests train them).
"""

import math
import os
from pathlib import Path

import torch
from torch import nn

from ume_edge.model import Modality, UMEModel

NUM_CLASSES = 16
SEQUENCE, VOCABULARY = 16, 64
SHAPES = {"camera": (3, 16, 16), "depth": (1, 32, 32), "text": (SEQUENCE,)}
DTYPES = {"camera": "float32", "depth": "float32", "text": "int64"}
FEATURES = 64


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // 4, 1), nn.SiLU(),
                                  nn.Conv2d(channels // 4, channels, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise 3x3, squeeze-and-excitation, pointwise projection (MobileNetV3)."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, stride: int):
        super().__init__()
        hidden = in_channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            SqueezeExcite(hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
            InvertedResidual(16, 16, 2, 1), InvertedResidual(16, 24, 3, 2), InvertedResidual(24, 24, 3, 1),
            nn.Conv2d(24, FEATURES, 1, bias=False), nn.BatchNorm2d(FEATURES), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.features(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, as ConvNeXt does."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvGeluEncoder(nn.Module):
    """Conv -> BatchNorm -> GELU (the encoder that broke the build in issue 10), then LayerNorm and GELU."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.GELU(),
            nn.Conv2d(32, FEATURES, 3, 2, 1), ChannelLayerNorm(FEATURES), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.LayerNorm(FEATURES), nn.Linear(FEATURES, FEATURES), nn.GELU())

    def forward(self, x):
        return self.project(self.features(x))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_width = heads, width // heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def split(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_width).transpose(1, 2)

    def forward(self, x, padding):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_width) - 1e4 * padding[:, None, None, :]
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return self.out(mixed)


class TransformerLayer(nn.Module):
    """Pre-LayerNorm: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, padding):
        x = x + self.attention(self.norm1(x), padding)
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token and positional embeddings, two Transformer layers, mean over the non-padding tokens (id 0 pads)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCABULARY, FEATURES, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(SEQUENCE, FEATURES) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(FEATURES, 4) for _ in range(2))
        self.norm = nn.LayerNorm(FEATURES)

    def forward(self, tokens):
        padding = (tokens == 0).float()
        x = self.tokens(tokens) + self.positions
        for layer in self.layers:
            x = layer(x, padding)
        keep = (1 - padding).unsqueeze(-1)
        return (self.norm(x) * keep).sum(1) / keep.sum(1).clamp(min=1)


ENCODERS = {"camera": MobileNetEncoder, "depth": ConvGeluEncoder, "text": TextTransformer}


def architecture() -> UMEModel:
    torch.manual_seed(0)
    modalities = [Modality(name, ENCODERS[name](), shape, DTYPES[name], FEATURES) for name, shape in SHAPES.items()]
    return UMEModel(modalities, NUM_CLASSES, name="assistant")


def build() -> UMEModel:
    model = architecture()
    model.load_state_dict(torch.load(Path(os.environ["CONFORMANCE_WEIGHTS"]) / "assistant.pt", weights_only=True))
    return model
