"""The plan files the TensorRT fakes build and load, and a stand-in for TensorRT's ``trtexec`` that writes them.

A fake plan is ``MAGIC``, one line of JSON (``PlanHeader``: what the builder was asked for and where it ran), then the
ONNX file it was built from: ``trt_fakes.FakeTensorRT`` deserializes it and computes with ONNX Runtime on that ONNX.

``install_trtexec(folder, release, device)`` writes an executable ``trtexec`` that behaves as trtexec of that TensorRT
release does for the flags ume-edge writes: it prints the version banner, refuses options its major version does not
have (``ACCEPTED_FLAGS``), sets the builder flags trtexec 10 sets for ``--useDLACore``
(``kPREFER_PRECISION_CONSTRAINTS`` and, unless ``--int8``, ``kFP16``; sampleEngines.cpp, 10.3-10.16) and fails, as
TensorRT 10 does, when a precision flag meets a strongly typed network (NVIDIA/TensorRT#4253), or when DLA is asked of
a release or device without it. Each call is appended to ``calls.jsonl`` beside it. It is Python (this file, run by the
test's interpreter), not a shell script, so that it writes the same plans the fake builder writes; it imports neither
the fakes nor pytest, so it starts fast.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAGIC = b"UME-EDGE FAKE TENSORRT PLAN\n"
PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")
# NVIDIA, "Working with DLA" (TensorRT 11.4.1): 10.x up to 10.7, then 11.4.1 on; 11.4.0 only on Windows on ARM.
LAST_10X_WITH_DLA = (10, 7)
FIRST_11X_WITH_DLA = (11, 4, 1)

# The options of trtexec that ume-edge's lines may use, per major version, with whether each takes a value
# (trtexec --help of 10.3-10.16 and 11.1; docs/development.md, "TensorRT": 11 lost --fp16, --int8, --best and
# --calib, and its --stronglyTyped is a deprecated no-op).
_COMMON_FLAGS = {"--onnx": True, "--saveEngine": True, "--minShapes": True, "--optShapes": True,
                 "--maxShapes": True, "--memPoolSize": True, "--timingCacheFile": True, "--useDLACore": True,
                 "--allowGPUFallback": False, "--hardwareCompatibilityLevel": True, "--versionCompatible": False,
                 "--stronglyTyped": False, "--help": False}
ACCEPTED_FLAGS = {10: {**_COMMON_FLAGS, "--fp16": False, "--int8": False, "--best": False, "--calib": True},
                  11: dict(_COMMON_FLAGS)}
HARDWARE_LEVELS = {"none": False, "ampere+": True, "sameComputeCapability": False}


def release_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", release))


def has_dla(release: str) -> bool:
    version = release_tuple(release)
    return (version[0] == 10 and version[:2] <= LAST_10X_WITH_DLA) or version[:3] >= FIRST_11X_WITH_DLA


def release_number(release: str) -> int:
    """How trtexec prints a release in its banner: 10.3.0 is ``v100300``."""
    major, minor, patch = (*release_tuple(release), 0, 0)[:3]
    return major * 10000 + minor * 100 + patch


@dataclass
class Device:
    """The GPU (and its DLA cores) a fake TensorRT builds on and runs on."""

    gpu_name: str = "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int] = (9, 0)
    dla_cores: int = 0


H100 = Device()
ORIN = Device("Orin", (8, 7), dla_cores=2)


@dataclass
class PlanHeader:
    """What a plan was built with: the TensorRT release and GPU, typing, builder flags and profile."""

    tensorrt: str
    gpu_name: str
    compute_capability: str
    strongly_typed: bool
    builder_flags: list[str]
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    dla: bool = False
    version_compatible: bool = False
    hardware_compatible: bool = False
    timing_cache_entries: int = 0
    notes: list[str] = field(default_factory=list)


def serialize_plan(header: PlanHeader, onnx_bytes: bytes) -> bytes:
    return MAGIC + json.dumps(asdict(header)).encode() + b"\n" + onnx_bytes


def parse_plan(data: bytes) -> tuple[PlanHeader, bytes] | None:
    """The header and ONNX of a fake plan; None for anything else."""
    if not data.startswith(MAGIC):
        return None
    line, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
    return PlanHeader(**json.loads(line)), onnx_bytes


def timing_cache_bytes(release: str, device: Device, entries: int) -> bytes:
    return b"UME-EDGE FAKE TIMING CACHE " + json.dumps(
        {"tensorrt": release, "compute_capability": list(device.compute_capability), "entries": entries}).encode()


def read_timing_cache(data: bytes) -> dict | None:
    """A fake timing cache's origin and size; None for bytes that are not one."""
    prefix = b"UME-EDGE FAKE TIMING CACHE "
    return json.loads(data[len(prefix):]) if data.startswith(prefix) else None


def timing_cache_matches(data: bytes, release: str, device: Device) -> bool:
    origin = read_timing_cache(data)
    return origin is not None and origin["tensorrt"] == release and \
        tuple(origin["compute_capability"]) == tuple(device.compute_capability)


# ---------------------------------------------------------------- trtexec


class TrtexecError(Exception):
    pass


def _parse_arguments(argv: list[str], major: int) -> dict[str, str | bool]:
    accepted = ACCEPTED_FLAGS[major]
    options = {}
    for argument in argv:
        name, has_value, value = argument.partition("=")
        if name not in accepted:
            raise TrtexecError(f"Unknown option: {name}")
        if accepted[name] != bool(has_value):
            raise TrtexecError(f"option {name} {'needs' if accepted[name] else 'takes no'} value")
        options[name] = value if has_value else True
    return options


def _shapes(text: str) -> dict[str, list[int]]:
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def _builder_flags(options: dict, major: int) -> list[str]:
    flags = []
    if major == 10:
        flags += ["FP16"] if options.get("--fp16") or options.get("--best") else []
        flags += ["INT8"] if options.get("--int8") or options.get("--best") else []
        if "--useDLACore" in options:
            flags.append("PREFER_PRECISION_CONSTRAINTS")
            if not options.get("--int8") and "FP16" not in flags:
                flags.append("FP16")
    flags += ["GPU_FALLBACK"] if options.get("--allowGPUFallback") else []
    flags += ["VERSION_COMPATIBLE"] if options.get("--versionCompatible") else []
    return flags


def _onnx_inputs(onnx_bytes: bytes) -> dict[str, int]:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    initializers = {i.name for i in graph.initializer}
    return {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input if i.name not in initializers}


def _profile(options: dict, onnx_bytes: bytes, dla: bool) -> dict[str, list[list[int]]]:
    kinds = ("--minShapes", "--optShapes", "--maxShapes")
    if not all(kind in options for kind in kinds):
        raise TrtexecError("dynamic inputs need --minShapes, --optShapes and --maxShapes")
    given = [_shapes(options[kind]) for kind in kinds]
    inputs = _onnx_inputs(onnx_bytes)
    if any(set(shapes) != set(inputs) for shapes in given):
        raise TrtexecError(f"the shapes name {sorted(given[2])}; the network's inputs are {sorted(inputs)}")
    profile = {}
    for name, rank in inputs.items():
        low, opt, high = (shapes[name] for shapes in given)
        ordered = len(low) == len(opt) == len(high) == rank and all(
            a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
        if not ordered:
            raise TrtexecError(f"invalid profile for {name}: {low} {opt} {high}")
        profile[name] = [high, high, high] if dla else [low, opt, high]  # DLA has no dynamic shapes
    return profile


def build_plan(options: dict, release: str, device: Device) -> PlanHeader:
    """The header of the plan trtexec ``options`` build, or ``TrtexecError`` saying why TensorRT refuses."""
    major = release_tuple(release)[0]
    flags = _builder_flags(options, major)
    strongly_typed = major >= 11 or bool(options.get("--stronglyTyped"))
    if strongly_typed and (refused := [f for f in flags if f in PRECISION_FLAGS]):
        raise TrtexecError(f"Error Code 2: Internal Error (Assertion !config.getFlag(BuilderFlag::k{refused[0]}) "
                           "failed. Precision flags are not allowed for a strongly typed network)")
    dla = "--useDLACore" in options
    if dla and not has_dla(release):
        raise TrtexecError(f"TensorRT {release} has no DLA support")
    if dla and not 0 <= int(options["--useDLACore"]) < device.dla_cores:
        raise TrtexecError(f"--useDLACore={options['--useDLACore']}: this device has {device.dla_cores} DLA core(s)")
    level = options.get("--hardwareCompatibilityLevel", "none")
    if level not in HARDWARE_LEVELS:
        raise TrtexecError(f"invalid --hardwareCompatibilityLevel={level}")
    onnx_bytes = Path(options["--onnx"]).read_bytes()
    return PlanHeader(tensorrt=release, gpu_name=device.gpu_name,
                      compute_capability="{}.{}".format(*device.compute_capability), strongly_typed=strongly_typed,
                      builder_flags=flags, profile=_profile(options, onnx_bytes, dla), dla=dla,
                      version_compatible="VERSION_COMPATIBLE" in flags, hardware_compatible=HARDWARE_LEVELS[level])


def trtexec(argv: list[str], release: str, device: Device) -> int:
    banner = f"[TensorRT v{release_number(release)}] # trtexec {' '.join(argv)}"
    print(f"&&&& RUNNING TensorRT.trtexec {banner}")
    major = release_tuple(release)[0]
    try:
        options = _parse_arguments(argv, major)
        if options.get("--help"):
            print(f"=== trtexec {release} ===\n" + "\n".join(sorted(ACCEPTED_FLAGS[major])))
            return 0
        if "--onnx" not in options or "--saveEngine" not in options:
            raise TrtexecError("this stand-in builds plans only: give --onnx and --saveEngine")
        if major >= 11 and options.get("--stronglyTyped"):
            print("[W] --stronglyTyped is deprecated: networks are always strongly typed")
        header = build_plan(options, release, device)
        _use_timing_cache(options.get("--timingCacheFile"), release, device, header)
        Path(options["--saveEngine"]).write_bytes(serialize_plan(header, Path(options["--onnx"]).read_bytes()))
    except (TrtexecError, OSError) as error:
        print(f"[E] {error}\n&&&& FAILED TensorRT.trtexec {banner}")
        return 1
    print(f"&&&& PASSED TensorRT.trtexec {banner}")
    return 0


def _use_timing_cache(path: str | None, release: str, device: Device, header: PlanHeader) -> None:
    if path is None:
        return
    cache = Path(path)
    entries = 0
    if cache.exists() and timing_cache_matches(cache.read_bytes(), release, device):
        entries = read_timing_cache(cache.read_bytes())["entries"]
    elif cache.exists():
        header.notes.append("timing cache mismatch: started a fresh one")
    header.timing_cache_entries = entries
    cache.write_bytes(timing_cache_bytes(release, device, entries + 1))


def install_trtexec(folder: Path, release: str, device: Device = H100) -> Path:
    """Write an executable ``folder/trtexec`` of TensorRT ``release`` on ``device``; put ``folder`` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trtexec"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import fake_trtexec\n"
        f"with open({str(folder / 'calls.jsonl')!r}, 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"device = fake_trtexec.Device({device.gpu_name!r}, {tuple(device.compute_capability)!r}, {device.dla_cores})\n"
        f"sys.exit(fake_trtexec.trtexec(sys.argv[1:], {release!r}, device))\n")
    path.chmod(0o755)
    return path


def trtexec_calls(folder: Path) -> list[list[str]]:
    """The arguments of every call of the ``trtexec`` installed in ``folder``, in order."""
    log = folder / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def path_with(folder: Path) -> str:
    """``PATH`` with ``folder`` first."""
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
