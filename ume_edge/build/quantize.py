"""Calibration and Q/DQ quantisation per target, and the fp16 conversion.

One calibration pass per modality gives two files (FACTS.md): **U8S8** (uint8 activations, int8 per-channel
weights) for ONNX Runtime on the CPU, where it is 2-4x faster than fp32; and symmetric **S8S8** for TensorRT
(signed int8, zero-point 0, per-channel weights, no quantised bias, a dedicated Q/DQ pair per consumer). The second
file reuses the first one's ranges through ONNX Runtime's calibration cache.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIB_METHODS = ("entropy", "percentile", "minmax")
CALIB_BATCH = 32
TENSORRT_QDQ_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                        "DedicatedQDQPair": True}


@dataclass
class QuantizedFiles:
    cpu_u8s8: Path
    tensorrt_s8s8: Path
    calibration_cache: Path


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")
    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]


def _reader(input_name: str, samples: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    # ORT's histogram calibrators stack per-batch outputs, so every batch must have the same size: the tail that
    # does not fill a batch is left out.
    size = min(CALIB_BATCH, len(samples))
    usable = len(samples) // size * size

    class ArrayReader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: samples[i:i + size]} for i in range(0, usable, size)])

        def get_next(self):
            return next(self.batches, None)

    return ArrayReader()


def quantize_modality(fp32_path: Path, input_name: str, samples: np.ndarray, method: str,
                      work_dir: Path) -> QuantizedFiles:
    """Calibrate ``fp32_path`` once on ``samples`` and write the U8S8 (CPU) and S8S8 (TensorRT) Q/DQ files."""
    from onnxruntime.quantization import quant_pre_process

    stem = f"{input_name}-{method}"
    prepared = work_dir / f"{stem}.prep.onnx"
    files = QuantizedFiles(work_dir / f"{stem}.u8s8.onnx", work_dir / f"{stem}.s8s8.onnx",
                           work_dir / f"{stem}.calibration.json")
    files.calibration_cache.unlink(missing_ok=True)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs every tensor at INFO
    with contextlib.redirect_stdout(io.StringIO()):  # and its histogram calibrators print their progress
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        _quantize_twice(prepared, files, input_name, samples, method)
    prepared.unlink()
    return files


def _quantize_twice(prepared: Path, files: QuantizedFiles, input_name: str, samples: np.ndarray, method: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                  calibrate_method=_ort_method(method), calibration_cache_path=files.calibration_cache)
    quantize_static(str(prepared), str(files.cpu_u8s8), _reader(input_name, samples),
                    activation_type=QuantType.QUInt8, **common)
    quantize_static(str(prepared), str(files.tensorrt_s8s8), None, activation_type=QuantType.QInt8,
                    extra_options=dict(TENSORRT_QDQ_OPTIONS), **common)


def to_fp16(fp32_path: Path, out_path: Path) -> Path:
    """An fp16 copy of the model with fp32 inputs and outputs (TensorRT 11 takes precision from the ONNX)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path
