"""Turn a trained UME-MMA model into an engine directory: ``python -m ume_edge.build``, or ``build(BuildOptions())``.

The stages are modules of their own (``inputs``, ``export``, ``quantize`` and ``qdq_rules``, ``gate``, then the
backend's compile, and ``ume_edge.engine_dir`` to publish); ``stages`` runs them in order, after ``options`` has
checked what was asked.
"""

from ume_edge.build.options import BuildOptions
from ume_edge.build.stages import build, default_out, ensure_default_engines

__all__ = ["BuildOptions", "build", "default_out", "ensure_default_engines"]
