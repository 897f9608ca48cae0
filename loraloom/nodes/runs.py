"""Runs inside ComfyUI: names, folders and the metrics a page reload needs. No ComfyUI imports here.

Every run lives in ``<ComfyUI output>/loraloom/runs/<name>/`` (the engine's ``output.run_dir``); nodes pass the
name or a :class:`TrainedRun` between them, never a path the user typed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.metrics import read_metrics

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
RUNS_SUBFOLDER = Path("loraloom") / "runs"
CACHE_SUBFOLDER = Path("loraloom") / "cache"


class RunNameError(ValueError):
    """A run name that is not a plain folder name."""


@dataclass(frozen=True)
class TrainedRun:
    """What the Train steps node hands downstream: where the run is and how far it got."""
    name: str
    run_dir: Path
    step: int
    total_steps: int
    adapter_file: Path  # the adapter exported at ``step``, in the stock LoraLoader's format


@dataclass(frozen=True)
class LossHistory:
    """Training and validation loss of a run so far (steps in optimizer steps)."""
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    val_steps: tuple[int, ...]
    val_losses: tuple[float, ...]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> LossHistory:
        train = [(r["step"], r["loss"]) for r in records if r.get("type") == "step"]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "validation"]
        return cls(tuple(s for s, _ in train), tuple(v for _, v in train),
                   tuple(s for s, _ in val), tuple(v for _, v in val))


def check_run_name(name: str) -> str:
    """``name`` if it is a safe run folder name: letters, digits, ``._-``, 1-64 characters, no leading dot."""
    if not RUN_NAME.fullmatch(name):
        raise RunNameError(f"run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                           "not starting with a dot (it becomes a folder name)")
    return name


def runs_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / RUNS_SUBFOLDER


def run_dir(output_dir: str | Path, name: str) -> Path:
    return runs_root(output_dir) / check_run_name(name)


def existing_run_dir(output_dir: str | Path, name: str) -> Path | None:
    """The folder of an existing run called ``name``, or None; never a folder outside the runs folder."""
    try:
        folder = run_dir(output_dir, name)
    except RunNameError:
        return None
    root = runs_root(output_dir).resolve()
    resolved = folder.resolve()
    if resolved.parent != root or not resolved.is_dir():
        return None
    return resolved


def metrics_response(output_dir: str | Path, name: str) -> dict[str, Any] | None:
    """Body of ``GET /loraloom/runs/{name}/metrics``: every metrics record of the run; None: no such run."""
    folder = existing_run_dir(output_dir, name)
    if folder is None:
        return None
    return {"run": name, "events": read_metrics(folder)}
