"""The run's metrics log: JSON lines, flushed per record so the UI and the CLI can read a live run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..loaders.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: they are re-done after a resume, so each step is logged once."""
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete records of a run (a half-written last line of a live run is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
