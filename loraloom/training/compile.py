"""``train.compile``: torch.compile of each repeated block (regional compilation), its code cached across runs.

Each block's ``forward`` is compiled, not the module call: forward hooks (block offloading) and gradient
checkpointing wrap the compiled code as they wrap the eager one, and the adapter's layers and rank dropout
inside are traced with it. The blocks of one kind share their compiled code (same code, same shapes), so a
model of two block kinds compiles two blocks, however deep it is. Inductor's caches go to
``<cache_dir>/torchinductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` names another folder: the next run (or a resumed
one) loads the compiled kernels instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .offload import repeated_blocks

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_blocks(model: torch.nn.Module, cache_root: Path, backend: str = "inductor") -> int:
    """Compile the forward of every repeated block of ``model`` (compiled at its first call); returns how many.

    Inductor's cache moves to ``<cache_root>/torchinductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` names another
    folder than torch's default (which torch writes into the environment itself when it first looks)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get(CACHE_ENV, default_cache_dir()) == default_cache_dir():
        os.environ[CACHE_ENV] = str(Path(cache_root).resolve() / "torchinductor")
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)
    return len(blocks)
