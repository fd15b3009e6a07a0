"""``trtexec`` lines that build the same plans as ``config.build_engine``, and shell scripts of them per TensorRT major
version, to run on a target that has TensorRT but not ume-edge's build (a Jetson, an NGC container)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from ume_edge.backends.tensorrt.compat import FIRST_11X_WITH_DLA, LAST_10X_WITH_DLA
from ume_edge.backends.tensorrt.config import BuildConfig, builder_settings

# One representative release per supported major: what the lines are checked against (builder_settings refuses DLA on
# releases without it, so the 10.x representative is the last one with DLA).
MAJOR_RELEASES = {10: "10.7.0", 11: "11.4.1"}
TRTEXEC_FLAGS = {"GPU_FALLBACK": "--allowGPUFallback", "VERSION_COMPATIBLE": "--versionCompatible",
                 "FP16": "--fp16", "INT8": "--int8"}


@dataclass(frozen=True)
class PlanJob:
    """One plan to build: its ONNX and plan paths (relative to where the script runs), inputs and configuration."""

    onnx: str
    plan: str
    inputs: dict[str, tuple[int, ...]]
    config: BuildConfig


def trtexec_command(job: PlanJob, major: int) -> str:
    """The trtexec command line for TensorRT ``major`` that builds the plan ``build_engine`` would."""
    settings = builder_settings(job.config, MAJOR_RELEASES[major])
    args = ["trtexec", f"--onnx={job.onnx}", f"--saveEngine={job.plan}"]
    for kind, batch in settings["profile_batch"].items():
        shapes = ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape))}" for name, shape in job.inputs.items())
        args.append(f"--{kind}Shapes={shapes}")
    args.append(f"--memPoolSize=workspace:{job.config.workspace_mb}M")
    if settings["timing_cache"]:
        args.append(f"--timingCacheFile={settings['timing_cache']}")
    if settings["DLA_core"] is not None:
        args.append(f"--useDLACore={settings['DLA_core']}")
    if settings["hardware_compatibility_level"] == "AMPERE_PLUS":
        args.append("--hardwareCompatibilityLevel=ampere+")
    # trtexec 10 builds weakly typed unless told; trtexec 11 is always strongly typed (--stronglyTyped is a no-op).
    args += [TRTEXEC_FLAGS[flag] for flag in settings["builder_flags"]]
    if "STRONGLY_TYPED" in settings["network_flags"]:
        args.append("--stronglyTyped")
    return " ".join(shlex.quote(os.fspath(a)) for a in args)


def _release_number(version: tuple[int, ...]) -> int:
    """How trtexec prints a version: ``[TensorRT v100300]`` is 10.3.0."""
    major, minor, patch = (*version, 0, 0)[:3]
    return major * 10000 + minor * 100 + patch


def _version_check(major: int, uses_dla: bool) -> list[str]:
    """Shell lines that stop the script on a trtexec of another major version (or one without DLA, when needed)."""
    low, high = _release_number((major,)), _release_number((major, 99, 99))
    if uses_dla and major == 10:
        high = _release_number((*LAST_10X_WITH_DLA, 99))
    if uses_dla and major == 11:
        low = _release_number(FIRST_11X_WITH_DLA)
    wanted = f"TensorRT {major}.x" + (" with DLA" if uses_dla else "")
    return [
        'found=$(trtexec --help 2>&1 | sed -n "s/.*TensorRT v\\([0-9][0-9]*\\).*/\\1/p" | head -n 1)',
        'if [ -z "$found" ]; then',
        '  echo "warning: could not read the TensorRT version from trtexec; building anyway" >&2',
        f'elif [ "$found" -lt {low} ] || [ "$found" -gt {high} ]; then',
        f'  echo "error: this script is for {wanted} (trtexec v{low} to v{high}); trtexec here is v$found. Use the '
        'script for your TensorRT version." >&2',
        '  exit 1',
        'fi',
    ]


def script(jobs: list[PlanJob], major: int, next_step: str) -> str:
    """A POSIX shell script that builds every plan of ``jobs`` with trtexec from TensorRT ``major``."""
    uses_dla = any(job.config.dla_core is not None for job in jobs)
    lines = [
        "#!/bin/sh",
        f"# Builds {len(jobs)} TensorRT plan(s) with trtexec from TensorRT {major}.x "
        f"({'JetPack 6' if major == 10 else 'JetPack 7 / TensorRT 11'}). Written by ume-edge; run it on the target.",
        "set -eu",
        'cd "$(dirname "$0")"',
        *_version_check(major, uses_dla),
    ]
    for job in jobs:
        folder = str(PurePosixPath(job.plan).parent)
        lines += [f'echo "building {job.plan}"'] + ([f"mkdir -p {shlex.quote(folder)}"] if folder != "." else [])
        lines.append(trtexec_command(job, major))
    lines.append(f'echo "done. {next_step}"')
    return "\n".join(lines) + "\n"
