"""Engine step time divided by a bare PyTorch + diffusers + peft loop's, measured in one process; and the
engine's step with LoRA dropout on the rank-r activation against peft's dropout on the layer input.

Same model, batch, precision, LoRA (dropout 0.1), gradient checkpointing and 512 text tokens. The engine with
peft's input dropout (adapter.dropout_on = "input") is compared with the bare loop, which can only do that;
the engine with rank dropout (the default) with the engine with input dropout. Steps of the three loops are
interleaved in rounds so that load on a shared machine hits them alike; the figures are ratios of medians.

    python benchmarks/step_overhead.py [--rounds 8] [--steps 3] [--precision bf16]
    python benchmarks/step_overhead.py --smoke   # the tiny model, one round: checks that the script runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.training.config import RunConfig, load_config, to_toml
from loraloom.training.demo_data import write_shapes_dataset
from loraloom.training.families import flux, flux_vae
from loraloom.training.families.flux_kit import TINY, FluxSize, build, write
from loraloom.training.objectives import flow_match_inputs, sample_timesteps
from loraloom.training.session import Session

# Real head size and context/pooled widths, fewer heads and blocks so a CPU step takes about a second.
BENCH = FluxSize(heads=4, head_dim=128, double_blocks=2, single_blocks=2, t5_width=4096, t5_heads=64,
                 t5_ff=256, clip_width=768, vae_widths=(32, 32, 64))


def engine_config(files: dict, images: Path, run: Path, args: argparse.Namespace, dropout_on: str) -> Path:
    cfg = RunConfig()
    cfg = replace(
        cfg,
        model=replace(cfg.model, diffusion_model=str(files["diffusers"]), text_encoder=str(files["diffusers"]),
                      text_encoder_2=str(files["diffusers"]), vae=str(files["diffusers"]),
                      text_length=args.text_length),
        data=replace(cfg.data, images=str(images), resolution=args.resolution, validation_images=0),
        adapter=replace(cfg.adapter, rank=16, alpha=16.0, dropout=0.1, dropout_on=dropout_on,
                        targets="attention_mlp"),
        train=replace(cfg.train, steps=10_000, batch_size=args.batch, mixed_precision=args.precision,
                      gradient_checkpointing=True, checkpoint_every=0, validate_every=0),
        output=replace(cfg.output, run_dir=str(run)),
    )
    path = run.parent / f"{run.name}.toml"
    path.write_text(to_toml(cfg))
    return path


class BareLoop:
    """What a user would write by hand with diffusers and peft: the reference the engine must match."""

    def __init__(self, folder: Path, session: Session, precision: str):
        self.model = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True,
                                                            torch_dtype=session.compute_dtype)
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1,
                                          target_modules=flux.TARGETS["attention_mlp"]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        self.params = params
        self.model.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.dtype = session.compute_dtype
        item = session.val_items[0]  # with data.validation_images = 0, a training image
        b = session.cfg.train.batch_size
        self.x0 = flux_vae.scale_latents(item.latent[None].repeat(b, 1, 1, 1))
        self.t5 = item.text["t5"][None].repeat(b, 1, 1)
        self.pooled = item.text["pooled"][None].repeat(b, 1)
        h, w = self.x0.shape[-2:]
        self.img_ids, self.txt_ids = flux.image_ids(h, w), torch.zeros(self.t5.shape[1], 3)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        b, _, h, w = self.x0.shape
        noise = torch.randn(self.x0.shape, generator=self.generator)
        t = sample_timesteps("auto_shift", b, self.generator, image_tokens=h * w // 4)
        xt, target = flow_match_inputs(self.x0, noise, t)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(hidden_states=flux.pack(xt), encoder_hidden_states=self.t5,
                             pooled_projections=self.pooled, timestep=t, img_ids=self.img_ids, txt_ids=self.txt_ids,
                             guidance=torch.ones(b), return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(flux.unpack(out.float(), h, w), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps of each loop per round")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-length", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 64 px, 16 tokens, fp32, one step a loop")
    args = parser.parse_args()
    size = BENCH
    if args.smoke:
        size, args.rounds, args.steps, args.resolution, args.text_length = TINY, 1, 1, 64, 16
        args.precision = "fp32"  # bf16 matmuls are slow on CPUs without bf16 units
    with tempfile.TemporaryDirectory(prefix="loraloom-bench-") as scratch:  # gigabytes of model files
        root = Path(scratch)
        files = write(build(size, seed=0), root / "models")
        write_shapes_dataset(root / "images", count=4, size=args.resolution, seed=0, trigger="zwx")
        engines = {form: Session.open(load_config(engine_config(files, root / "images", root / form, args, form)))
                   for form in ("input", "rank")}
        bare = BareLoop(files["diffusers"], engines["input"], args.precision)
        loops = {"engine, input dropout": lambda: engines["input"].step(1),
                 "engine, rank dropout": lambda: engines["rank"].step(1), "bare, input dropout": bare.step}
        for loop in loops.values():  # warm-up
            loop(), loop()
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                times[name] += [timed(loop) for _ in range(args.steps)]
        median = {name: statistics.median(t) for name, t in times.items()}
        tokens = (args.resolution // 16) ** 2
        print(f"model: hidden {size.heads * size.head_dim}, {size.double_blocks}+{size.single_blocks} blocks, "
              f"context {size.t5_width}; batch {args.batch}, {tokens} image + {args.text_length} text tokens, "
              f"{args.precision}, LoRA r16 dropout 0.1, gradient checkpointing; "
              f"torch threads {torch.get_num_threads()}")
        for name, value in median.items():
            print(f"{name}: median {value:.3f} s/step over {len(times[name])} steps")
        e, r, b = median["engine, input dropout"], median["engine, rank dropout"], median["bare, input dropout"]
        print(f"ratio engine/bare = {e / b:.3f} (both with peft's input dropout)")
        print(f"ratio rank dropout/input dropout = {r / e:.3f} (engine)")


if __name__ == "__main__":
    main()
