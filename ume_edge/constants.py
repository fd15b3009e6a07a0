"""Names and defaults shared by the build, the runtime, serving and the client: one home for each."""

from __future__ import annotations

from pathlib import Path

# Tensors of the engines (docs/ENGINE_FORMAT.md): each modality's engine maps its input to PARTIAL_LOGITS; the
# fusion maps PARTIAL_LOGITS [B, M, C] and PRESENT [B, M] to LOGITS and PROBS.
PARTIAL_LOGITS = "partial_logits"
PRESENT = "present"
LOGITS = "logits"
PROBS = "probs"
LABEL = "label"

PRECISIONS = ("fp32", "fp16", "int8")
ONNX_OPSET = 17
INPUT_DTYPES = ("float32", "int64")

DEFAULT_PRECISION = "int8"
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_DROP = 1.0
DEFAULT_CALIB_METHOD = "entropy"

# Triton: the entry model, the fusion model, and one encoder model per modality.
ENTRY_MODEL = "ume"
FUSION_MODEL = "fusion"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
# The dynamic batcher's wait for a fuller batch, one default for serve and triton_repo. Measured here: any delay only
# adds latency at low load, and requests that queue while a batch runs are batched anyway.
DEFAULT_MAX_QUEUE_DELAY_US = 0

# The checkout, for tests and tools only: installed, this is site-packages, so nothing in ume_edge/ uses it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_MODEL_NAME = "avdigits"


def default_engines_dir() -> Path:
    """Where builds go by default: ``./engines`` under the working directory (never inside the installed package)."""
    return Path.cwd() / "engines"


def encoder_model_name(modality: str) -> str:
    """The Triton model that serves one modality's encoder."""
    return f"ume_{modality}"
