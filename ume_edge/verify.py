"""``python -m ume_edge.verify DIR``: do these engines, here, still answer what the build recorded?

Runs DIR's engines on this machine (or, with ``--url``, a served deployment of them) on the golden inputs of DIR's
verification record, every presence pattern with and without the ``present`` mask, and compares with the build's own
answers and with fp32 PyTorch (``ume_edge.verification``). Prints one table and one verdict line; exit 0 when the
deployment holds, 1 when it does not, 2 when it could not be checked.

    python -m ume_edge.verify engines/reference-int8-onnxruntime
    python -m ume_edge.verify engines/reference-int8-onnxruntime --url jetson.local:8001
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ume_edge import engine_dir, verification
from ume_edge.atomic import write_text_atomically
from ume_edge.cli_common import DefaultsFormatter, show_progress
from ume_edge.constants import ENTRY_MODEL
from ume_edge.errors import UmeEdgeError

SERVE_EXTRA_HINT = "pip install 'ume-edge[serve]'"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ume_edge.verify", formatter_class=DefaultsFormatter,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", type=Path, metavar="DIR", help="the engine directory whose record to check against")
    parser.add_argument("--url", help="HOST:PORT of a served deployment (Triton gRPC) to check instead of running "
                                      "DIR's engines here (default: run them here)")
    parser.add_argument("--model", default=ENTRY_MODEL, help="the served entry model (with --url)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per engine when running here (default: the runtime's own choice)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="seconds to wait for each served answer")
    parser.add_argument("--json", type=Path, help="also write the verdict and every row to this file (default: none)")
    return parser.parse_args(argv)


def check_here(directory: Path, manifest: engine_dir.Manifest, threads: int | None = None) -> verification.Verdict:
    """DIR's engines on this machine against DIR's record."""
    from ume_edge.runtime import Pipeline

    golden = verification.load_golden(directory, manifest)
    with Pipeline.load(directory, threads) as pipeline:
        observed, partials = verification.run_engines(pipeline, golden.inputs)
    assert manifest.verification is not None  # load_golden refuses a directory without one
    return verification.compare(manifest.verification, golden, observed, partials)


def check_served(directory: Path, manifest: engine_dir.Manifest, url: str, model: str = ENTRY_MODEL,
                 timeout_s: float = 60.0) -> verification.Verdict:
    """The deployment served at ``url`` against DIR's record."""
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise UmeEdgeError(f"--url needs Triton's gRPC client: {SERVE_EXTRA_HINT}") from None
    golden = verification.load_golden(directory, manifest)
    client = grpcclient.InferenceServerClient(url)
    try:
        if not client.is_model_ready(model, client_timeout=timeout_s):
            raise UmeEdgeError(f"{url} serves no ready model {model!r}; check --url and --model")
        observed = verification.run_served(client, model, golden.inputs, manifest.fusion.modality_order,
                                           manifest.max_batch, timeout_s)
    except grpcclient.InferenceServerException as error:
        raise UmeEdgeError(f"{url}: {error.message() or error}; is the server up, and is it serving {directory}?") \
            from None
    finally:
        client.close()
    assert manifest.verification is not None
    return verification.compare(manifest.verification, golden, observed)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    show_progress()
    try:
        manifest = engine_dir.load(args.engines)
        _check_writable(args.json)
        if args.url:
            verdict = check_served(args.engines, manifest, args.url, args.model, args.timeout_s)
        else:
            verdict = check_here(args.engines, manifest, args.threads)
    except (UmeEdgeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    where = f"{args.model} at {args.url}" if args.url else "the engines, run here"
    print(f"{where} against the record of {args.engines}:\n")
    print(verification.table(verdict))
    print(f"\n{verdict.message}")
    if args.json and not _written(args.json, verdict):
        return 2
    return 0 if verdict.holds else 1


def _check_writable(path: Path | None) -> None:
    """Refuse a ``--json`` path that could not be written, before the check runs."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise UmeEdgeError(f"--json {path}: {'is a folder' if path.is_dir() else 'its folder does not exist'}; give "
                           "a file in an existing folder")


def _written(path: Path, verdict: verification.Verdict) -> bool:
    """``verdict`` as JSON at ``path``, through a temporary file beside it (a failed write leaves no half file)."""
    try:
        write_text_atomically(path, json.dumps(verdict.to_json(), indent=1))
        return True
    except OSError as error:
        print(f"error: --json {path}: could not write the verdict ({error})", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())
