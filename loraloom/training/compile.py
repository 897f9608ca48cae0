"""``train.compile``: torch.compile of each repeated block (regional compilation), its code cached across runs.

Each block's ``forward`` is compiled, not the module call: forward hooks (block offloading, the adapter's rank
dropout inside stay traced) and gradient checkpointing wrap the compiled code as they wrap the eager one. The
blocks of one kind share their compiled code (same code, same shapes), so a Flux model compiles two blocks,
not 57. Inductor's caches go to ``<cache_dir>/torchinductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set: the
next run (or a resumed one) loads the compiled kernels instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .offload import repeated_blocks

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_blocks(model: torch.nn.Module, cache_root: Path) -> int:
    """Compile the forward of every repeated block of ``model``; returns how many."""
    os.environ.setdefault(CACHE_ENV, str(Path(cache_root) / "torchinductor"))
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)
