"""What ``model.vram_budget`` estimates and picks for each family's released model, without a GPU.

For every registered family with a full-size model (``Family.full_size``), a rank-16 LoRA on its default
targets, bf16 compute, batch 1 at 512² and 1024²: the weights per storage precision, the activations autograd
saves (without checkpointing / with it / with them offloaded too), the estimate of every rung of the planner's
ladder, and the set-up it picks for 8 to 80 GB. Everything is measured on the meta device (shapes only), with
each family's own forward pass, in seconds on a CPU; ``gpu.py`` prints a GPU's real peak beside the same
estimates.

    python benchmarks/memory_plan.py
    python benchmarks/memory_plan.py --smoke   # the tiny models at 64 px: checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from loraloom.training import memory
from loraloom.training.config import RunConfig
from loraloom.training.families import FAMILIES
from loraloom.training.families.base import Family, Geometry

BUDGETS = (8, 12, 16, 24, 48, 80)
RUNGS = ("bf16", "+ checkpointing", "fp8", "nf4", "nf4 + blocks offloaded", "+ activations offloaded")


def measured(family: Family, resolution: int, smoke: bool) -> memory.Sizes:
    if smoke:
        tiny = family.tiny(seed=0)
        model, factor = tiny.denoiser, family.vae_factor(tiny.vae)
        with torch.no_grad():
            text = {k: v[0] for k, v in family.encode_text(tiny.text, ["a photo"]).items()}
    else:
        full = family.full_size()
        model, factor, text = full.denoiser, full.vae_factor, full.text
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=16, alpha=16.0))
    side = resolution // factor
    return memory.measure(torch.nn.Module.to(model, torch.bfloat16), family, cfg,
                          torch.empty(family.latent_channels, side, side), text,
                          Geometry((resolution, resolution), (0, 0), (resolution, resolution)), torch.bfloat16)


def setup(plan: memory.MemoryPlan) -> str:
    precision = "bf16" if plan.base_precision == "auto" else plan.base_precision
    parts = [precision, *(["checkpointing"] if plan.gradient_checkpointing else []),
             *(["blocks offloaded"] if plan.offload == "blocks" else []),
             *(["activations offloaded"] if plan.offload_activations else [])]
    return ", ".join(parts) + ("" if plan.fits else " (does not fit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny models at 64 px")
    args = parser.parse_args()
    resolutions = (64,) if args.smoke else (512, 1024)
    gb = memory.GB
    for name, family in sorted(FAMILIES.items()):
        try:
            family.full_size()
        except NotImplementedError as e:
            print(f"# {name}: skipped ({e})")
            continue
        sizes = {r: measured(family, r, args.smoke) for r in resolutions}
        print(f"\n### {family.title}\n")
        print("| | " + " | ".join(f"{r}²" for r in resolutions) + " |")
        print("|---|" + "---|" * len(resolutions))
        s = sizes[resolutions[0]]
        print(f"| weights bf16 / fp8 / nf4 (GB) | {s.weights['auto'] / gb:.2f} / {s.weights['fp8'] / gb:.2f} / "
              f"{s.weights['nf4'] / gb:.2f} |" + " same |" * (len(resolutions) - 1))
        print(f"| adapter + gradient + AdamW (GB) | {s.adapter / gb:.2f} |" + " same |" * (len(resolutions) - 1))
        print("| activations: saved / checkpointed / + offloaded (GB) | " + " | ".join(
            f"{z.activations / gb:.2f} / {z.activations_checkpointed / gb:.2f} / {z.activations_offloaded / gb:.2f}"
            for z in sizes.values()) + " |")
        print(f"| estimate: {' / '.join(RUNGS)} (GB) | " + " | ".join(
            " / ".join(f"{memory.estimate(z, *rung)['total'] / gb:.1f}" for rung in memory.LADDER)
            for z in sizes.values()) + " |")
        for budget in BUDGETS:
            print(f"| {budget} GB | " + " | ".join(setup(memory.plan(budget, z)) for z in sizes.values()) + " |")


if __name__ == "__main__":
    main()
