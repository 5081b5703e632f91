"""What each process imports: the receiving process stays free of the codecs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The node's own compressing side: only worker processes import these.
WORKER_ONLY = (
    "node.codecs.transcode",
    "node.codecs.frames",
    "node.codecs.pixels",
    "node.codecs.charls",
    "node.codecs.plugins",
    "node.codecs.verify",
    "node.routing",
    "node.part10",
    "imagecodecs",
)
CODEC_LIBRARIES = {
    "numpy",
    "gdcm",
    "openjpeg",
    "charls",
    "imagecodecs",
    "pylibjpeg",
    "jpeg_ls",
    "rle",
}


def modules_after(statement: str) -> set[str]:
    """sys.modules of a fresh interpreter that ran ``statement`` (this checkout's node)."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    return set(json.loads(out.stdout))


def test_the_receiving_process_imports_no_codec() -> None:
    node = modules_after("import node.service")
    assert not sorted(m for m in node if m.startswith(WORKER_ONLY))
    # pydicom 3.0 itself imports numpy and the decoder packages it finds (pydicom.config
    # loads its pixel data handlers); nothing beyond that may come from the node.
    pydicom_alone = modules_after("import pydicom, pynetdicom")
    libraries = {m.split(".")[0] for m in node} & CODEC_LIBRARIES
    assert libraries <= {m.split(".")[0] for m in pydicom_alone}


def test_config_and_pipeline_import_no_transcoder() -> None:
    for module in ("node.config", "node.scp", "node.pipeline", "node.cli"):
        loaded = modules_after(f"import {module}")
        assert not sorted(m for m in loaded if m.startswith(WORKER_ONLY)), module
