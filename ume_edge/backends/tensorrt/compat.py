"""Which TensorRT, GPU and DLA a plan may run on, and which TensorRT versions have DLA at all."""

from __future__ import annotations

from ume_edge.backends.tensorrt.api import version_tuple
from ume_edge.errors import EngineMismatch

AMPERE = (8, 0)  # the oldest compute capability a hardware-compatible (AMPERE_PLUS) plan runs on
REBUILD_HINT = "rebuild on the target: python -m ume_edge.build --backend tensorrt ..."
# NVIDIA, "Working with DLA" (TensorRT 11.4.1): 10.7 was the last 10.x release with DLA; 11.0-11.3 have none; 11.4.0
# has it only on Windows on ARM; 11.4.1 on Jetson AGX Orin with JetPack 7.2.2 or later. JetPack 6 ships 10.x.
LAST_10X_WITH_DLA = (10, 7)
FIRST_11X_WITH_DLA = (11, 4, 1)


def dla_problem(tensorrt_version: str) -> str | None:
    """Why TensorRT ``tensorrt_version`` cannot build or run DLA plans on a Jetson; None when it can."""
    version = version_tuple(tensorrt_version)
    if version[:1] == (10,) and version[:2] <= LAST_10X_WITH_DLA:
        return None
    if version[:3] >= FIRST_11X_WITH_DLA:
        return None
    if version[:3] == (11, 4, 0):
        return "TensorRT 11.4.0 has DLA only on Windows on ARM; use TensorRT 11.4.1+ on JetPack 7.2.2+"
    return (f"TensorRT {tensorrt_version} has no DLA support: use TensorRT 10.0-10.7 (JetPack 6) or 11.4.1+ "
            "(Jetson AGX Orin, JetPack 7.2.2+), or build for the GPU without --dla-core")


def check_plan_compatible(recorded: dict, current: dict) -> None:
    """Raise ``EngineMismatch`` unless a plan built on ``recorded`` (a manifest's device) runs on ``current``
    (``api.device_info()`` here): same TensorRT and compute capability, or what compatibility allows."""
    problems = _version_problems(recorded, current) + _hardware_problems(recorded, current)
    if recorded.get("dla_core") is not None:
        problem = dla_problem(current.get("tensorrt") or "0")
        problems += [problem] if problem else []
    if problems:
        raise EngineMismatch("the TensorRT plan does not fit this machine: " + "; ".join(problems)
                             + f"; {REBUILD_HINT}")


def _version_problems(recorded: dict, current: dict) -> list[str]:
    built, here = recorded.get("tensorrt"), current.get("tensorrt")
    problem = f"it was built with TensorRT {built} and this machine has TensorRT {here}"
    if built == here:
        return []
    if not recorded.get("version_compatible"):
        return [problem]
    # A version-compatible plan runs on the TensorRT that built it or any newer one, never an older one.
    if version_tuple(here) >= version_tuple(built):
        return []
    return [f"{problem} (a version-compatible plan needs the same or a newer TensorRT)"]


def _hardware_problems(recorded: dict, current: dict) -> list[str]:
    built, here = recorded.get("compute_capability"), current.get("compute_capability")
    problem = (f"it was built for compute capability {built} ({recorded.get('gpu_name')}) and this GPU "
               f"({current.get('gpu_name')}) has compute capability {here}")
    if built == here:
        return []
    if not recorded.get("hardware_compatible"):
        return [problem]
    if version_tuple(here) >= AMPERE:
        return []
    return [f"{problem} (a hardware-compatible plan needs compute capability 8.0 or newer)"]
