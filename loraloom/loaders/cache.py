"""Encoder outputs cached on disk, keyed by content and encoder identity.

Layout: ``<root>/<kind>/<encoder fingerprint>/<content key>.safetensors``. A changed image, caption or
encoder gives a new key, so stale entries are never read; only the changed entry is recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
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

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Indices of the ``keys`` with no entry (counted as misses, the others as hits); nothing is read."""
        absent = [i for i, key in enumerate(keys) if not self.path(key).is_file()]
        self.hits += len(keys) - len(absent)
        self.misses += len(absent)
        return absent

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_safetensors(tensors, self.path(key))

    def get_many(self, keys: list[str], compute: Callable[[list[int]], list[dict[str, torch.Tensor]]]
                 ) -> list[dict[str, torch.Tensor]]:
        """Entries for ``keys``; ``compute(missing_indices)`` produces the absent ones, which are stored."""
        out = [self._read(self.path(key)) for key in keys]
        missing = [i for i, v in enumerate(out) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, entry in zip(missing, compute(missing)):
                self.put(keys[i], entry)
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
