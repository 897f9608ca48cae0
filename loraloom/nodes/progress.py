"""Translate the engine's events into the ``loraloom.progress`` payloads the front end draws. No ComfyUI here.

One :class:`ProgressReport` lives for one execution of the Train steps node; it keeps only what the payload
needs (the latest previews, the rate of this execution), and hands each payload to ``send``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENT = "loraloom.progress"
Payload = dict[str, Any]


class ProgressReport:
    def __init__(self, node: str, run: str, total: int, output_dir: str | Path,
                 send: Callable[[Payload], None], clock: Callable[[], float] = time.monotonic):
        self.node, self.run, self.total = node, run, total
        self.output_dir = Path(output_dir).resolve()
        self.send = send
        self.clock = clock
        self.step = 0
        self.saved_step: int | None = None  # step of the newest checkpoint this run has on disk
        self.last_state: str | None = None
        self.images: list[dict[str, str]] = []
        self._rate_start: tuple[float, int] | None = None  # (time, step) of the first step of this execution
        self._rate: float | None = None

    def state(self, state: str, message: str | None = None) -> None:
        """Report a state change: loading, training, saving, done, cancelled or error."""
        self._send(state, message=message)

    def forward(self, payload: Payload) -> None:
        """Pass on a payload made by a worker process's report."""
        self.step, self.last_state = payload["step"], payload["state"]
        self.send(payload)

    def on_engine_event(self, event: dict[str, Any]) -> None:
        """The Session's ``on_event`` callback."""
        kind = event.get("type")
        self.step = event.get("step", self.step)
        if kind == "step":
            self._update_rate()
            self._send("training", points=[{"step": event["step"], "loss": event["loss"], "lr": event["lr"]}])
        elif kind == "validation":
            self._send("training", validation=[{"step": event["step"], "val_loss": event["val_loss"]}])
        elif kind == "preview":
            self.images = [self._view_ref(Path(event["path"]))]
            self._send("training")
        elif kind == "checkpoint":
            self.saved_step = event["step"]
        elif kind == "resume":
            self.saved_step = event["step"]
            self._send("loading", message=f"continuing from the checkpoint at step {event['step']}")

    def _update_rate(self) -> None:
        now = self.clock()
        if self._rate_start is None:
            # The first step includes warm-up; the rate counts from its end.
            self._rate_start = (now, self.step)
            return
        t0, s0 = self._rate_start
        if now > t0 and self.step > s0:
            self._rate = (self.step - s0) / (now - t0)

    def _view_ref(self, path: Path) -> dict[str, str]:
        """``/view`` arguments for a file under the output folder."""
        rel = path.resolve().relative_to(self.output_dir)
        return {"filename": rel.name, "subfolder": rel.parent.as_posix(), "type": "output"}

    def _send(self, state: str, *, points: list | None = None, validation: list | None = None,
              message: str | None = None) -> None:
        self.last_state = state
        eta = (self.total - self.step) / self._rate if self._rate else None
        self.send({"node": self.node, "run": self.run, "state": state, "step": self.step, "total": self.total,
                   "it_s": self._rate, "eta_s": eta, "points": points or [], "validation": validation or [],
                   "images": self.images, "message": message})
