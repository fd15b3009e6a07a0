"""NGC ``tritonserver`` container releases that the Kubernetes manifests can pin, with the TensorRT and Python each
ships and where that was read.

A TensorRT plan runs only on the TensorRT release that built it, so a TensorRT engine directory picks the release
whose TensorRT has the same major.minor as its manifest records. Only rows confirmed from a named source are kept;
``--image`` overrides the choice for any release not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ume_edge.errors import UmeEdgeError

IMAGE_REPOSITORY = "nvcr.io/nvidia/tritonserver"
IMAGE_FLAVOUR = "py3"


class ImageError(UmeEdgeError):
    """No tritonserver release is known for what the engine directory needs; the message names the known ones."""


@dataclass(frozen=True)
class NgcRelease:
    release: str   # the container release, "YY.MM"
    tensorrt: str  # major.minor of the TensorRT inside the -py3 image
    python: str    # major.minor of the Python that the Python backend's stub embeds
    sources: tuple[str, ...]

    @property
    def tag(self) -> str:
        """The image tag, also KServe's ``runtimeVersion``."""
        return f"{self.release}-{IMAGE_FLAVOUR}"

    @property
    def image(self) -> str:
        return f"{IMAGE_REPOSITORY}:{self.tag}"


RELEASES = (
    NgcRelease(
        release="24.10", tensorrt="10.5", python="3.10",
        sources=("Python 3.10 (Ubuntu 22.04): triton-inference-server/server docs/introduction/release_notes.md "
                 "at 0194c3da9ddeeff07547f46aa058cf88acb51893 (the 24.10 notes)",
                 "TensorRT 10.5: a public project README that builds plans for tritonserver:24.10-py3 with TensorRT "
                 "10.5 (found by code search, 2026-12-06); not confirmed against NVIDIA's Frameworks Support "
                 "Matrix, which could not be read from here")),
)
DEFAULT_RELEASE = RELEASES[-1]  # the newest listed: ONNX Runtime directories need no particular TensorRT


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def release_for_tensorrt(version: str) -> NgcRelease:
    """The listed release whose TensorRT has ``version``'s major.minor (the newest if several)."""
    wanted = major_minor(version)
    matching = [release for release in RELEASES if release.tensorrt == wanted]
    if not matching:
        known = ", ".join(f"{r.tag} (TensorRT {r.tensorrt})" for r in RELEASES)
        raise ImageError(f"no known tritonserver release ships TensorRT {wanted}, which built these plans (known: "
                         f"{known}); pass --image with a tritonserver image whose TensorRT is {wanted}")
    return matching[-1]
