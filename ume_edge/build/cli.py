"""``python -m ume_edge.build``: the command line of the build (and of ``--adopt``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ume_edge import backends, engine_dir
from ume_edge.backends.base import BackendOptions
from ume_edge.build.inputs import DEFAULT_CALIB, TorchMissing, require_torch
from ume_edge.build.options import BuildOptions
from ume_edge.build.quantize import CALIB_METHODS
from ume_edge.build.stages import build
from ume_edge.build.summary import format_summary
from ume_edge.cli_common import DefaultsFormatter, show_progress
from ume_edge.constants import (
    DEFAULT_CALIB_METHOD,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DROP,
    DEFAULT_PRECISION,
    PRECISIONS,
)
from ume_edge.errors import UmeEdgeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.build", formatter_class=DefaultsFormatter,
        description="Turn a trained UME-MMA model into per-modality engines, a fusion kernel and a manifest. "
                    "With no options: the shipped AV-Digits reference model, INT8, ONNX Runtime on this CPU.",
        epilog="examples:\n  python -m ume_edge.build --precision int8   (writes engines/reference-int8-onnxruntime/)\n"
               "  python -m ume_edge.build --backend tensorrt --export-only   (TensorRT-ready files for a Jetson)\n"
               "  python -m ume_edge.build --adopt engines/DIR   (on the Jetson, after DIR's build_plans_trt10.sh)")
    parser.add_argument("--model", help="checkpoint from `python -m ume_edge.train`, or path/to/file.py:factory "
                                        "(default: the shipped reference model)")
    parser.add_argument("--trust-encoder", dest="trusted_encoders", metavar="MODULE:CLASS", action="append",
                        type=_encoder_name, default=[],
                        help="an encoder class a --model checkpoint may name besides ume-edge's own (repeatable; "
                             "default: none). A checkpoint is data: building its model imports the module it names, "
                             "which runs that module's code, so trust only classes you wrote or installed")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="engine precision; INT8 falls back per modality when it costs more than --max-drop")
    parser.add_argument("--backend", choices=("auto", *backends.NAMES), default="auto",
                        help="auto: TensorRT when it is importable and a CUDA GPU is present, else ONNX Runtime")
    parser.add_argument("--calib-data", help="NPZ with one array per modality, or NAME:SPLIT of a shipped data "
                                             f"set (default: {DEFAULT_CALIB}, the calibration split shipped with "
                                             "ume-edge)")
    parser.add_argument("--eval-data", help="NPZ with one array per modality and `labels` when known (default: "
                                            "avdigits:val for a model trained on AV-Digits, else the calibration data)")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default=DEFAULT_CALIB_METHOD,
                        help="tried first; the others are tried if it costs more than --max-drop")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="largest batch the engines accept")
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                        help="largest accuracy drop (points, any presence pattern) INT8 may cost a modality")
    parser.add_argument("--out", type=Path, help="engine directory (default: engines/reference-<precision>-<backend> "
                                                 "for the shipped model, engines/<model>-<hash>-<precision>-<backend> "
                                                 "for others); only an engine directory ume-edge wrote is replaced")
    parser.add_argument("--export-only", action="store_true",
                        help="with --backend tensorrt: write the TensorRT-ready ONNX, scripts and manifest; "
                             "build no plan")
    parser.add_argument("--adopt", type=Path, metavar="DIR",
                        help="make an export-only DIR whose scripts built the plans here into an engine directory "
                             "(default: build instead)")
    parser.add_argument("--accept-verification", action="store_true",
                        help="with --adopt: publish even when the adopted engines do not answer what the build "
                             "recorded (python -m ume_edge.verify); the measured numbers go into the manifest")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for verification (default: all cores)")
    parser.add_argument("--allow-chance-accuracy", action="store_true",
                        help="build even when the fp32 model is no better than chance on the evaluation data")
    for options_type in backends.options_types().values():
        options_type.add_arguments(parser)
    return parser


def _encoder_name(text: str) -> str:
    try:
        require_torch("--trust-encoder")
    except TorchMissing as missing:
        raise argparse.ArgumentTypeError(str(missing)) from None
    from ume_edge.model import ENCODER_NAME  # torch: only when the option is used, so --help stays quick

    if not ENCODER_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected module:Class (e.g. mypackage.encoders:AudioEncoder), got {text!r}")
    return text


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> BuildOptions:
    fields = set(BuildOptions.__dataclass_fields__) - {"backend_options"}
    return BuildOptions(**{k: v for k, v in vars(args).items() if k in fields},
                        backend_options=_backend_options(parser, args, argv))


def _backend_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     argv: list[str] | None) -> BackendOptions | None:
    """The options of the backend whose flags were given (None when none were); flags of two backends at once are
    a usage error."""
    types = backends.options_types()
    unset = object()  # argparse keeps a value already in the namespace, so only given flags replace this
    probe = argparse.Namespace(**dict.fromkeys(set().union(*(t.field_names() for t in types.values())), unset))
    given = {name for name, value in vars(parser.parse_args(argv, namespace=probe)).items() if value is not unset}
    owners = {name: options_type for name, options_type in types.items() if given & options_type.field_names()}
    if len(owners) > 1:
        parser.error(f"options of {' and '.join(owners)} given together; a build uses one backend")
    return next((options_type(**{k: getattr(args, k) for k in given & options_type.field_names()})
                 for options_type in owners.values()), None)


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.accept_verification and args.adopt is None:
        parser.error("--accept-verification accepts what --adopt measured; give it with --adopt DIR")
    show_progress()
    started = time.perf_counter()
    published = None
    try:
        if args.adopt is not None:
            from ume_edge.build.adopt import adopt

            published = adopt(args.adopt, args.accept_verification)
        else:
            published = build(_options(parser, args, argv))
        summary = format_summary(engine_dir.load(published), published, time.perf_counter() - started)
    except (UmeEdgeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as interrupt:
        print(_interrupted(getattr(interrupt, "out", published), args), file=sys.stderr)
        raise SystemExit(130) from None
    print(summary)


def _interrupted(published: Path | None, args: argparse.Namespace) -> str:
    if published is not None:
        return (f"interrupted after the build completed: it was published at {published} (only the summary was cut "
                f"short; {published / engine_dir.MANIFEST_FILE} records what it shows)")
    if args.adopt is not None:
        return f"interrupted: nothing was written; {args.adopt} is as it was"
    return "interrupted: nothing was written; --out is as it was"
