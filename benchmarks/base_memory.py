"""Memory of the frozen Flux base per storage precision (model.base_precision), and the nf4 output error.

Builds a real-width Flux transformer (3072 wide, 24 heads of 128) with one double and one single block,
loads it the way the engine does in each precision, and counts the bytes of its parameters and buffers.
Full Flux has 19 double and 38 single blocks; the full-size figure is extrapolated from the per-block bytes
(measured as a 2+2 model minus a 1+1 model of the same width).

    python benchmarks/base_memory.py
    python benchmarks/base_memory.py --smoke   # the tiny width: checks that it runs
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from loraloom.training.families import flux
from loraloom.training.families.flux_kit import REAL_WIDTH, TINY, build, write
from loraloom.training.precision import quantize_nf4, store_float8

FLUX_DOUBLE, FLUX_SINGLE = 19, 38


def stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load(path: Path, precision: str) -> torch.nn.Module:
    """As Session._load_model stores the base (bf16 compute), without the adapter."""
    model = flux.load_transformer(path, torch.bfloat16, fp8_storage=precision == "fp8")
    store_float8(model, convert=precision == "fp8")
    if precision == "nf4":
        quantize_nf4(model, flux.TARGETS["all_linear"], torch.bfloat16, torch.device("cpu"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny width instead of the real one")
    args = parser.parse_args()
    width = TINY if args.smoke else REAL_WIDTH
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for blocks in (1, 2):
            size = replace(width, double_blocks=blocks, single_blocks=blocks)
            written = write(build(size, seed=0), Path(tmp) / str(blocks), diffusers=False)
            files[blocks] = written["diffusion_model_fp8"]  # fp8 on disk: the file users download
        print("| precision | 1+1 blocks | per double + single block | full Flux (19 + 38), extrapolated |")
        print("|---|---|---|---|")
        for precision in ("bf16", "fp8", "nf4"):
            one, two = (stored_bytes(load(files[b], precision)) for b in (1, 2))
            per_block = two - one  # one double + one single block
            rest = one - per_block  # embedders and output layers
            # A single block is about half a double block's weights; weight them by parameter count.
            model = load(files[1], "bf16")
            double = sum(p.numel() for p in model.transformer_blocks.parameters())
            single = sum(p.numel() for p in model.single_transformer_blocks.parameters())
            full = rest + per_block * (FLUX_DOUBLE * double + FLUX_SINGLE * single) / (double + single)
            print(f"| {precision} | {one / 2**20:.0f} MiB | {per_block / 2**20:.0f} MiB | {full / 2**30:.1f} GiB |")
        x = torch.randn(256, width.heads * width.head_dim)
        plain = load(files[1], "bf16").transformer_blocks[0].attn.to_q
        quantized = load(files[1], "nf4").transformer_blocks[0].attn.to_q
        with torch.no_grad():
            ref = plain(x.bfloat16()).float()
            err = (quantized(x.bfloat16()).float() - ref).norm() / ref.norm()
        print(f"\nnf4 relative output error of one attention projection (fp8 weights as reference): {err:.3f}")


if __name__ == "__main__":
    main()
