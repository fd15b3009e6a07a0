"""``python -m ume_edge.triton_repo``: write a standard Triton model repository for an engine directory.

    python -m ume_edge.triton_repo --engines engines/reference-int8-onnxruntime --out triton_models/
    python -m ume_edge.triton_repo --out triton_models/ --kubernetes k8s/ --storage-uri s3://bucket/triton_models

See ``ume_edge.serving.repository`` for the layout and ``ume_edge.serving.kubernetes`` for the manifests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ume_edge import engine_dir
from ume_edge.cli_common import DefaultsFormatter
from ume_edge.constants import DEFAULT_MAX_QUEUE_DELAY_US
from ume_edge.errors import UmeEdgeError
from ume_edge.serving import kubernetes
from ume_edge.serving.repository import ENCODER_BACKENDS, ENTRIES, serve_hint, write_repository
from ume_edge.serving.repository_swap import check_out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.triton_repo", formatter_class=DefaultsFormatter,
        description="Write a Triton model repository (encoders, fusion, and the BLS entry model 'ume' that skips "
                    "absent modalities) for an engine directory, ONNX Runtime or TensorRT (export-only too). Serve "
                    "it with `python -m ume_edge.serve --repository DIR` here, or tritonserver on the target.")
    parser.add_argument("--engines", type=Path, help="engine directory written by python -m ume_edge.build (default: "
                                                     "the reference INT8 build, built first if missing)")
    parser.add_argument("--out", type=Path, default=Path("triton_models"), help="model repository to write into")
    parser.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default="auto",
                        help="auto: as the engine directory's backend (onnxruntime_onnx or tensorrt_plan); python: "
                             "Python-backend models running the ONNX files with ONNX Runtime")
    parser.add_argument("--entry", choices=ENTRIES, default="bls",
                        help="bls: 'ume' calls the encoder and fusion models; pipeline: 'ume' runs the whole "
                             "ume-edge Pipeline in Triton's Python stub (needs ume-edge installed there)")
    parser.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads in Python-backend models (default: ONNX Runtime's choice)")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                        help="dynamic batching delay in microseconds")
    parser.add_argument("--kubernetes", type=Path, default=None, metavar="DIR",
                        help="also write Kubernetes manifests into DIR: kserve.yaml (KServe InferenceService), "
                             "plain.yaml (Deployment, Services, ServiceMonitor, HPA, PDB) and, when the stock "
                             "tritonserver image cannot load the repository, a Dockerfile (docs/deploy.md; "
                             "default: none)")
    parser.add_argument("--storage-uri", default=None,
                        help="where the cluster reads the repository --out, at its root: s3://, gs:// or "
                             f"pvc://CLAIM/PATH (default: pvc://{kubernetes.DEFAULT_CLAIM}/<--out's name>)")
    parser.add_argument("--image", default=None,
                        help="the server image, pinned REGISTRY/NAME:TAG (default: the NGC tritonserver release "
                             "that fits the engine directory); required when a Dockerfile is written")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (the autoscaler's minimum)")
    return parser.parse_args(argv)


def _kubernetes_plan(args: argparse.Namespace) -> kubernetes.ManifestPlan:
    """The manifests' plan, decided (or refused) before the repository is written."""
    manifest = engine_dir.read_manifest(args.engines)
    options = kubernetes.KubernetesOptions(storage_uri=args.storage_uri, image=args.image, replicas=args.replicas)
    return kubernetes.plan(manifest, args.entry, args.encoder_backend, args.out.resolve().name, options)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        check_out(args.out)  # before the reference build, which takes minutes
        if args.kubernetes is not None:
            kubernetes.check_out_dir(args.kubernetes)
        if args.engines is None:
            from ume_edge.build import ensure_default_engines

            args.engines = ensure_default_engines()
        manifests = None if args.kubernetes is None else _kubernetes_plan(args)
        written = write_repository(args.engines, args.out, encoder_backend=args.encoder_backend, entry=args.entry,
                                   instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                   threads=args.threads)
        if manifests is not None:
            written += kubernetes.write_manifests(args.kubernetes, manifests)
    except UmeEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"serve with: {serve_hint(engine_dir.read_manifest(args.engines), args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
