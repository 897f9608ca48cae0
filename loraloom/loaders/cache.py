"""Encoder outputs cached on disk, keyed by content and encoder identity.

Layout: ``<root>/<kind>/<encoder fingerprint>/<content key>.safetensors``. A changed image, caption or
encoder gives a new key, so stale entries are never read; only the changed entry is recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .files import atomic_save_safetensors


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EncoderCache:
    """One folder of cached outputs of one encoder (identified by ``encoder_id``)."""

    def __init__(self, root: str | Path, kind: str, encoder_id: str):
        self.folder = Path(root) / kind / encoder_id
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get_many(self, keys: list[str], compute: Callable[[list[int]], list[dict[str, torch.Tensor]]]
                 ) -> list[dict[str, torch.Tensor]]:
        """Entries for ``keys``; ``compute(missing_indices)`` produces the absent ones, which are stored."""
        out: list[dict[str, torch.Tensor] | None] = []
        for key in keys:
            out.append(self._read(self.path(key)))
        missing = [i for i, v in enumerate(out) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, entry in zip(missing, compute(missing)):
                atomic_save_safetensors(entry, self.path(keys[i]))
                out[i] = entry
        return out  # type: ignore[return-value]

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor] | None:
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            return None  # a damaged entry is recomputed
