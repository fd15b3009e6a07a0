"""A modality in which NVIDIA's placement quantizes nothing (every GEMM narrower than 16 channels, too small for
INT8 tensor cores) takes the TensorRT fallback precision instead of failing the build on a file without Q/DQ."""

import subprocess
import sys

import numpy as np
import pytest

from ume_edge import engine_dir

pytestmark = pytest.mark.slow  # full builds

MODEL = """
import torch
from ume_edge.model import Modality, UMEModel

def build():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    return UMEModel([Modality("imu", encoder, (8,), "float32", 8)], 3, name="tiny")
"""


def test_a_modality_tensorrt_would_not_quantize_is_built_in_fp16(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL)
    np.savez(tmp_path / "calib.npz", imu=np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--model", f"{tmp_path / 'tiny.py'}:build",
                             "--calib-data", str(tmp_path / "calib.npz"), "--backend", "tensorrt", "--export-only",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "imu: no layer TensorRT would run in INT8" in result.stderr
    manifest = engine_dir.load(tmp_path / "out")
    assert manifest.modality("imu").precision == "fp16" and manifest.tensorrt_rules["imu"] == []
