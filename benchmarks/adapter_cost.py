"""What each adapter algorithm costs against LoRA on one model: trainable parameters, exported file size, and
the CPU time of a training step (forward, backward, AdamW update).

Every algorithm at the same rank and alpha on the same Flux-architecture model (real head size 128 and context
4096, 4 heads, 2 double + 2 single blocks, attention + MLP layers), fp32, batch 1, 256 image tokens and 128 text
tokens. Steps of all algorithms are interleaved in rounds so that load on a shared machine hits them alike; the
figure is each median over the LoRA median.

    python benchmarks/adapter_cost.py [--rounds 6] [--rank 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.loaders.dataset import Geometry
from loraloom.training import adapters
from loraloom.training.config import AdapterConfig, TrainConfig
from loraloom.training.export import write_adapter
from loraloom.training.families import flux
from loraloom.training.families.base import DENOISER
from loraloom.training.families.flux_kit import FluxSize, build

BENCH = FluxSize(heads=4, head_dim=128, double_blocks=2, single_blocks=2, t5_width=4096, t5_heads=64,
                 t5_ff=256, clip_width=768, vae_widths=(32, 32, 64))
FAMILY = flux.Flux()


def variants(rank: int) -> dict[str, AdapterConfig]:
    """The algorithms at one rank; LoKr split by factor 8 (w1 8x8), its w2 then a rank product (512 / 8 = 64 >
    2 rank for rank < 32), and in full-matrix form as Kohaku XL trained it."""
    return {
        "lora": AdapterConfig(rank=rank, alpha=rank, targets="attention_mlp"),
        "locon": AdapterConfig(algorithm="locon", rank=rank, alpha=rank, targets="attention_mlp"),
        "loha": AdapterConfig(algorithm="loha", rank=rank, alpha=rank, targets="attention_mlp"),
        "lokr (factor 8)": AdapterConfig(algorithm="lokr", rank=rank, alpha=rank, factor=8, targets="attention_mlp"),
        "lokr (factor 8, full matrix)": AdapterConfig(algorithm="lokr", factor=8, full_matrix=True,
                                                      targets="attention_mlp"),
        "dora": AdapterConfig(algorithm="dora", rank=rank, alpha=rank, targets="attention_mlp"),
    }


class Run:
    """One algorithm on its own copy of the model, with its optimizer and a fixed batch."""

    def __init__(self, model: torch.nn.Module, settings: AdapterConfig, batch: dict):
        self.model = copy.deepcopy(model)
        self.adapter = adapters.attach({DENOISER: self.model}, {DENOISER: FAMILY.targets[settings.targets]},
                                       settings, seed=0)
        self.params = self.adapter.parameters()[DENOISER]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.batch = batch

    def step(self) -> float:
        start = time.perf_counter()
        b = self.batch
        self.model.train()
        pred = FAMILY.predict(self.model, b["x"], b["t"], b["text"], b["geometry"], 1.0)
        (pred - b["target"]).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="rank 2, one round: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.rank = 1, 2
    torch.set_num_threads(args.threads)
    model = build(BENCH, seed=0).denoiser.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    noised = FAMILY.noised(torch.randn(1, 16, 32, 32, generator=g), FAMILY.resolve_train(TrainConfig()), g)
    batch = {"x": noised.inputs, "t": noised.t, "target": noised.target,
             "text": {"t5": torch.randn(1, 128, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)},
             "geometry": [Geometry((512, 512), (0, 0), (512, 512))]}
    runs = {name: Run(model, settings, batch) for name, settings in variants(args.rank).items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run.step()  # warm-up
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run.step())
    with tempfile.TemporaryDirectory() as folder:
        sizes = {name: write_adapter(Path(folder) / "a.safetensors", run.adapter.export(), FAMILY, torch.bfloat16,
                                     {}).stat().st_size for name, run in runs.items()}
    params = {name: sum(p.numel() for p in run.params) for name, run in runs.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"rank {args.rank}, {len(runs['lora'].adapter.targets)} layers, {args.rounds} rounds, "
          f"{args.threads} threads")
    print("| algorithm | parameters | x LoRA | file (bf16) | x LoRA | s/step (median) | x LoRA |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {params[name]:,} | {params[name] / params['lora']:.2f} | {sizes[name] / 2**20:.2f} MiB | "
              f"{sizes[name] / sizes['lora']:.2f} | {median[name]:.3f} | {median[name] / median['lora']:.2f} |")


if __name__ == "__main__":
    main()
