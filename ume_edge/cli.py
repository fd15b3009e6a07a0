"""``ume-edge <verb> [args]``: one console command for every ume-edge command. ``ume-edge build ...`` runs what
``python -m ume_edge.build ...`` runs; a verb's module is imported only when that verb is run."""

from __future__ import annotations

import importlib
import sys

from ume_edge import __version__

# verb: (module whose main(argv) runs it, one line of help)
VERBS = {
    "build": ("ume_edge.build.cli", "turn a trained model into per-modality engines, a fusion kernel and a manifest"),
    "serve": ("ume_edge.serve", "serve an engine directory with a real tritonserver (entry model `ume`)"),
    "triton-repo": ("ume_edge.triton_repo", "write a standard Triton model repository for NGC containers and Jetson"),
    "client": ("ume_edge.client.cli", "replay a data set or a robot's recording as sensor streams over gRPC"),
    "ros2": ("ume_edge.ros2.cli", "a ROS 2 node: subscribed sensors to the served model, results and diagnostics"),
    "verify": ("ume_edge.verify", "check an engine directory or a served deployment against its build"),
    "bench": ("ume_edge.bench.cli", "turn pytest-benchmark results into a Markdown report and plots"),
    "train": ("ume_edge.train", "train a UME-MMA model over seeds and report the spread"),
}

# The top-level module a verb may find missing, and the package and extra that provide it.
EXTRAS = {
    "torch": ("PyTorch", "build"),
    "onnxconverter_common": ("onnxconverter-common", "build"),
    "pytriton": ("nvidia-pytriton", "serve"),
    "tritonclient": ("tritonclient", "serve"),
    "matplotlib": ("matplotlib", "bench"),
    "mcap": ("mcap", "sensors"),
    "mcap_ros2": ("mcap-ros2-support", "sensors"),
    "rosbags": ("rosbags", "sensors"),
    "PIL": ("Pillow", "sensors"),
    "prometheus_client": ("prometheus-client", "sensors"),
    "tensorrt": ("TensorRT", "tensorrt"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "\n".join([
        "usage: ume-edge <verb> [args...]",
        "",
        "Deploy UME-MMA multi-modal models, robust to missing modalities, as per-modality engines.",
        "",
        "verbs:",
        *lines,
        "",
        "`ume-edge VERB --help` shows a verb's options. Each verb is also `python -m ume_edge.VERB` (triton_repo with "
        "an underscore).",
    ])


def missing_extra(error: ImportError, command: str) -> str | None:
    """One line naming the extra to install when ``error`` is a module of an extra not being installed."""
    top_level = (error.name or "").split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or top_level not in EXTRAS:
        return None
    package, extra = EXTRAS[top_level]
    return f"{command} needs {package}, which is not installed: pip install 'ume-edge[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb == "--version":
        print(f"ume-edge {__version__}")
        return 0
    if verb not in VERBS:
        print(f"ume-edge: unknown verb {verb!r}; choose from {', '.join(VERBS)} (ume-edge --help)", file=sys.stderr)
        return 2
    try:
        return _run(VERBS[verb][0], rest)
    except ImportError as error:
        message = missing_extra(error, f"ume-edge {verb}")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(module_name: str, argv: list[str]) -> int:
    return importlib.import_module(module_name).main(argv) or 0
