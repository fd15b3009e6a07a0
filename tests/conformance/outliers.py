"""A model with an outlier feature, as trained Transformers and some CNNs grow them: one hidden unit of the ``imu``
encoder runs 1000 times larger than the others (``grow_outlier``), and the next layer's weights scale it back down.
fp32 computes the same function; one int8 scale for the whole activation tensor cannot hold the outlier and the
other units at once, whatever the calibration method, so the build has to keep that layer in float. The ``gps``
encoder is the same architecture without the outlier: it stays INT8 throughout.

``python -m ume_edge.build --model tests/conformance/outliers.py:build`` loads the weights from
``$CONFORMANCE_WEIGHTS/outliers.pt``.
"""

import os
from pathlib import Path

import torch
from torch import nn

from ume_edge.model import Modality, UMEModel

NUM_CLASSES = 4
SHAPES = {"imu": (32,), "gps": (32,)}
FEATURES = 64


class MLPEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(32, FEATURES), nn.ReLU(), nn.Linear(FEATURES, FEATURES), nn.ReLU(),
                                    nn.Linear(FEATURES, FEATURES), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


def architecture() -> UMEModel:
    torch.manual_seed(0)
    modalities = [Modality(name, MLPEncoder(), shape, "float32", FEATURES) for name, shape in SHAPES.items()]
    return UMEModel(modalities, NUM_CLASSES, name="outliers")


@torch.no_grad()
def grow_outlier(model: UMEModel, modality: str = "imu", unit: int = 0, factor: float = 1000.0) -> UMEModel:
    """Scale one hidden unit of the first layer up and its weights in the second layer down: ReLU commutes with a
    positive scale, so the function is unchanged."""
    first, second = model.encoders[modality].layers[0], model.encoders[modality].layers[2]
    first.weight[unit] *= factor
    first.bias[unit] *= factor
    second.weight[:, unit] /= factor
    return model


def build() -> UMEModel:
    model = architecture()
    model.load_state_dict(torch.load(Path(os.environ["CONFORMANCE_WEIGHTS"]) / "outliers.pt", weights_only=True))
    return model
