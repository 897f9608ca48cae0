"""Checkpoint folders written atomically, with a manifest of content hashes.

``<run>/checkpoints/step-00000100/`` holds the files and ``manifest.json`` (written last). A folder is
built under a temporary name and renamed into place, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from ..loaders.files import fsync_dir

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_checkpoint(run_dir: Path, step: int, files: dict[str, bytes], keep: int) -> Path:
    """Write ``files`` as the checkpoint of ``step``, then keep only the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashes = {}
    for name, data in files.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        hashes[name] = hashlib.sha256(data).hexdigest()
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": hashes}, indent=1))
    fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in valid_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _is_valid(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def valid_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints whose files match their manifest, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.glob("step-*")):
        if _is_valid(folder):
            found.append(folder)
        else:
            log.warning("checkpoint %s is incomplete or corrupt; ignoring it", folder)
    return found


def read_checkpoint(folder: Path) -> dict[str, bytes]:
    manifest = json.loads((folder / MANIFEST).read_text())
    return {name: (folder / name).read_bytes() for name in manifest["files"]}
