"""The engine directory: the contract between the build, the runtime, serving and Triton repositories.

This package is the only code that reads or writes ``manifest.json``. The manifest is a tree of typed records
(``Manifest`` below); ``load`` checks everything it can before anything is run: every field and its type, that
each file entry stays inside the directory and matches its SHA-256, and that each ONNX file's inputs and outputs are
what the manifest says. ``docs/ENGINE_FORMAT.md`` is generated from these records (``format_reference``).
``schema`` holds the records and the parser, ``validation`` the checks of a directory's files, ``publishing`` the
replace policy and the publish.

A build writes into a hidden staging folder beside ``--out`` and only then puts it in place (``staged``). ``--out``
is replaced only when it is absent, empty, or an engine directory that ume-edge wrote (nothing in it but the files its
manifest lists); anything else is refused and left untouched. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``, so at every instant ``--out`` is either the complete old build or the complete new
one. Staging folders left by killed builds are removed by the next build into the same parent folder.
"""

from ume_edge.engine_dir.publishing import (
                                            InterruptedAfterPublish,
                                            check_replaceable,
                                            discard,
                                            exchange,
                                            make_staging,
                                            pid_alive,
                                            publish,
                                            publish_holding_interrupt,
                                            remove_stale_staging,
                                            staged,
)
from ume_edge.engine_dir.schema import (
                                            BACKEND_NAMES,
                                            FORMAT,
                                            MANIFEST_FILE,
                                            REBUILD_HINT,
                                            SCHEMA_VERSION,
                                            STAGING_MARKER,
                                            FileRecord,
                                            FusionRecord,
                                            Manifest,
                                            ModalityRecord,
                                            ModelRecord,
                                            VerificationRecord,
                                            format_reference,
                                            parse_manifest,
)
from ume_edge.engine_dir.validation import (
                                            check_onnx_files,
                                            file_sha256,
                                            index_range,
                                            inside,
                                            load,
                                            read_manifest,
                                            record_file,
                                            save,
)
from ume_edge.errors import EngineMismatch

__all__ = ["BACKEND_NAMES", "FORMAT", "MANIFEST_FILE", "REBUILD_HINT", "SCHEMA_VERSION", "STAGING_MARKER",
           "EngineMismatch", "FileRecord", "FusionRecord", "InterruptedAfterPublish", "Manifest", "ModalityRecord",
           "ModelRecord", "VerificationRecord",
           "check_onnx_files", "check_replaceable", "discard", "exchange", "file_sha256",
           "format_reference", "index_range", "inside", "load", "make_staging", "parse_manifest", "pid_alive",
           "publish", "publish_holding_interrupt", "read_manifest", "record_file", "remove_stale_staging", "save",
           "staged"]
