"""What ComfyUI logs while it loads and applies an adapter file, for the scripts the host tests run inside ComfyUI."""

from __future__ import annotations

import logging


class Capture(logging.Handler):
    """The messages logged at WARNING and above since the last ``messages.clear()``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def adapter_report(self) -> dict[str, list[str]]:
        """The adapter keys ComfyUI did not load, and the errors it logged applying the rest: comfy/lora.py and
        comfy/weight_adapter log them and leave the layer unpatched."""
        return {"not_loaded": [m for m in self.messages if "lora key not loaded" in m or "NOT LOADED" in m],
                "errors": [m for m in self.messages if m.startswith("ERROR") or "MISMATCH" in m
                           or "Calculate Weight Failed" in m or "not recognized" in m]}
