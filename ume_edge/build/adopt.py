"""``python -m ume_edge.build --adopt DIR``: an export-only directory whose engines were built on the target (by its
``build_plans_*.sh`` script) becomes an engine directory that ``Pipeline.load`` accepts. Each engine is loaded with
the local runtime, checked against the manifest, and recorded with its hash and the device it runs on. The adopted
engines then run the directory's verification record (``ume_edge.verify``): plans that answer differently from what
the build recorded are refused unless the user accepts the measured numbers; either way they go into the manifest."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ume_edge import backends, engine_dir
from ume_edge.build.failures import write_failure
from ume_edge.build.progress import note
from ume_edge.errors import BackendUnavailable, BuildError


def adopt(directory: Path, accept_verification: bool = False) -> Path:
    manifest = engine_dir.load(directory)
    if not manifest.export_only:
        raise BuildError(f"{directory} already holds engines (it was not written with --export-only); nothing to adopt")
    backend = backends.get(manifest.backend)
    if reason := backend.unavailable_reason():
        raise BackendUnavailable(reason)
    missing = [name for name in manifest.made_on_target if not (directory / name).is_file()]
    if missing:
        raise BuildError(f"{directory} lacks {', '.join(missing)}: run {' or '.join(manifest.scripts)} there first "
                         "(on the target, with TensorRT's trtexec on PATH)")
    with engine_dir.staged(directory, lambda error, staging: write_failure(error, staging, directory,
                                                                           "and adopt again")) as staging:
        shutil.copytree(directory, staging, dirs_exist_ok=True)
        engines, device = backend.adopt_engines(staging, manifest)
        for record in manifest.modalities:
            record.engine = engine_dir.record_file(staging, engines[record.name])
            note(f"{record.name}: adopted {record.engine.path}")
        manifest.fusion.engine = engine_dir.record_file(staging, engines["fusion"])
        manifest.export_only, manifest.made_on_target = False, []
        manifest.device = device
        manifest.versions[backend.name] = backend.version()
        manifest.accuracy["engines_run_by"] += f"; engines built on the target and adopted {time.strftime('%Y-%m-%d')}"
        engine_dir.save(staging, manifest)
        engine_dir.load(staging)
        if manifest.verification is not None:
            _verify_adopted(staging, manifest, accept_verification)
            engine_dir.save(staging, manifest)
        else:
            note(f"{directory} has no verification record (written before ume-edge 0.3): the adopted engines were "
                 "checked for shapes only")
    return directory


def _verify_adopted(staging: Path, manifest: engine_dir.Manifest, accept: bool) -> None:
    """Run the record on the adopted engines; refuse them when they fail, unless ``accept``; record the numbers."""
    from ume_edge.verify import check_here

    assert manifest.verification is not None
    verdict = check_here(staging, manifest)
    manifest.verification.checks.append({
        "where": "build --adopt", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": manifest.device,
        "accepted": accept and not verdict.holds, **verdict.to_json()})
    note(f"verification of the adopted engines: {verdict.message}")
    if not verdict.holds and not accept:
        worst = {row.pattern: round(row.vs_build, 4) for row in verdict.rows if not row.holds}
        raise BuildError(f"the adopted engines do not answer what the build recorded: {verdict.message}; "
                         f"failing |Δlogit| {worst}. Rebuild the plans with the directory's script (same "
                         "precision flags, its calibration cache), or, if these numbers are acceptable, adopt again "
                         "with --accept-verification (they are then recorded in the manifest)")
