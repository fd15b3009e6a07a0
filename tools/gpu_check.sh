#!/bin/sh
# The CUDA half of the TensorRT backend on a real GPU (tests/test_gpu_cuda.py: real cuda-python buffers, streams,
# events, 2-D copies and CUDA graphs around a CuPy stand-in for TensorRT's engine). Installs nothing: the machine
# needs Python with numpy, pytest, CuPy and cuda-python, and an NVIDIA GPU. Run from anywhere; when $OUT is set
# the output also goes to $OUT/gpu.log. Exits with pytest's status.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log=${OUT:+$OUT/gpu.log}
run() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

found = []
for name in ("numpy", "pytest", "cupy", "cupy-cuda13x", "cupy-cuda12x", "cuda-bindings", "cuda-python"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print("python", sys.version.split()[0], "|", ", ".join(found))
PY
    timeout 300 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_cuda.py 2>&1
}
if [ -n "$log" ]; then
    mkdir -p "$OUT"
    { run; echo "exit $?"; } | tee "$log"
    status=$(tail -n 1 "$log" | sed -n 's/^exit //p')
    exit "${status:-1}"
fi
run
