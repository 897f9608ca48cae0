"""Checkpoint folders written atomically, with a manifest of content hashes.

``<run>/checkpoints/step-00000100/`` holds the files and ``manifest.json`` (written last). A folder is
built under a temporary name, fsynced and renamed into place, so a crash at any moment leaves every
earlier checkpoint intact; old ones are deleted only after the new one is complete. Resuming verifies the
manifest and falls back to the next older checkpoint when the newest is corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

from ..loaders.files import fsync_dir

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_FOLDER = re.compile(r"step-(\d{8})")
# Test-only fault injection: a file naming a point and a count ("checkpoint.before-rename 2"); the process
# SIGKILLs itself the count-th time it reaches that point. Unset in normal runs.
FAULT_PLAN_ENV = "LORALOOM_FAULT_PLAN"
_fault_counts: dict[str, int] = {}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the earlier checkpoints are intact."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_folder(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}"


def fault_point(name: str) -> None:
    """SIGKILL this process here if the test-only fault plan names this point and its count is reached."""
    plan = os.environ.get(FAULT_PLAN_ENV)
    if not plan:
        return
    try:
        point, count = Path(plan).read_text().split()
    except (OSError, ValueError):
        return
    if point == name:
        _fault_counts[name] = _fault_counts.get(name, 0) + 1
        if _fault_counts[name] >= int(count):
            os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(run_dir: Path, step: int, files: dict[str, bytes], keep: int, keep_every: int = 0) -> Path:
    """Write ``files`` as the checkpoint of ``step``, then apply the retention policy.

    Retention keeps the newest ``keep`` checkpoints plus every one whose step is a multiple of
    ``keep_every`` (0: none). Raises :class:`CheckpointWriteError` when the disk is full or not writable.
    """
    root = checkpoint_dir(run_dir)
    final = step_folder(run_dir, step)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _recover_interrupted_writes(root)
        tmp.mkdir()
        hashes = {}
        for name, data in files.items():
            _write_durably(tmp / name, data)
            hashes[name] = hashlib.sha256(data).hexdigest()
            fault_point("checkpoint.file-written")
        _write_durably(tmp / MANIFEST, json.dumps({"step": step, "files": hashes}, indent=1).encode())
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _step_folders(root)
        raise CheckpointWriteError(
            e.errno, f"could not write the checkpoint of step {step} in {root} ({e.strerror or e}); "
            f"the previous checkpoint ({previous[-1].name if previous else 'none'}) is intact. Free disk space "
            f"or fix the folder's permissions, then run again: training resumes from it.") from e
    fault_point("checkpoint.before-rename")
    if final.exists():
        # The same step written again (e.g. checkpoint on demand right after a scheduled one): move the old
        # folder aside first, so a crash between the two renames leaves a complete copy to recover.
        aside = root / f".replaced-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    fault_point("checkpoint.before-retention")
    _apply_retention(root, final, keep, keep_every)
    return final


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _recover_interrupted_writes(root: Path) -> None:
    """Undo what a killed writer left: put a moved-aside folder back, delete half-written ones."""
    for aside in root.glob(".replaced-step-*"):
        final = root / aside.name.removeprefix(".replaced-")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _step_folders(root: Path) -> list[Path]:
    """Checkpoint folders that completed their rename (not verified), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _FOLDER.fullmatch(p.name))


def _apply_retention(root: Path, newest: Path, keep: int, keep_every: int) -> None:
    folders = _step_folders(root)
    kept = set(folders[-keep:]) | {newest}
    if keep_every:
        kept |= {f for f in folders if int(_FOLDER.fullmatch(f.name).group(1)) % keep_every == 0}
    for old in folders:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def verified_files(folder: Path) -> dict[str, bytes] | None:
    """The files of a checkpoint if every one matches its manifest hash, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {name: (folder / name).read_bytes() for name in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = all(hashlib.sha256(files[name]).hexdigest() == digest for name, digest in manifest["files"].items())
    return files if ok else None


def newest_valid_checkpoint(run_dir: Path) -> tuple[Path, dict[str, bytes]] | None:
    """The newest checkpoint whose files match its manifest, with those files; corrupt newer ones are
    skipped with a warning (the run resumes from the one before)."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        _recover_interrupted_writes(root)
    for folder in reversed(_step_folders(root)):
        files = verified_files(folder)
        if files is not None:
            return folder, files
        log.warning("checkpoint %s is incomplete or corrupt (its files do not match manifest.json); "
                    "falling back to the one before it", folder)
    return None
