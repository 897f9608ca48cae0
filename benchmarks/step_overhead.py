"""Engine step time divided by a bare PyTorch + diffusers + peft loop's, measured in one process.

Same model, batch, precision, LoRA (with dropout), gradient checkpointing and 512 text tokens. Steps of the
two loops are interleaved in rounds so that load on a shared machine hits both alike; the figure is the
ratio of medians.

    python benchmarks/step_overhead.py [--rounds 8] [--steps 3] [--precision bf16]
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
from loraloom.training.families import flux
from loraloom.training.families.flux_kit import FluxSize, build, write
from loraloom.training.objectives import flow_match_inputs, sample_timesteps
from loraloom.training.session import Session

# Real head size and context/pooled widths, fewer heads and blocks so a CPU step takes about a second.
BENCH = FluxSize(heads=4, head_dim=128, double_blocks=2, single_blocks=2, t5_width=4096, t5_heads=64,
                 t5_ff=256, clip_width=768, vae_widths=(32, 32, 64))


def engine_config(files: dict, images: Path, run: Path, precision: str, batch: int, resolution: int) -> Path:
    cfg = RunConfig()
    cfg = replace(
        cfg,
        model=replace(cfg.model, transformer=str(files["diffusers"]), text_encoder=str(files["diffusers"]),
                      text_encoder_2=str(files["diffusers"]), vae=str(files["diffusers"]), text_length=512),
        data=replace(cfg.data, images=str(images), resolution=resolution, validation_images=0),
        adapter=replace(cfg.adapter, rank=16, alpha=16.0, dropout=0.1, targets="attention_mlp"),
        train=replace(cfg.train, steps=10_000, batch_size=batch, mixed_precision=precision,
                      gradient_checkpointing=True, checkpoint_every=0, validate_every=0),
        output=replace(cfg.output, run_dir=str(run)),
    )
    path = run.parent / "bench.toml"
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
        item = session.train_items[0]
        b = session.cfg.train.batch_size
        self.x0 = flux.scale_latents(item.latent[None].repeat(b, 1, 1, 1))
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
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loraloom-bench-"))
    files = write(build(BENCH, seed=0), root / "models")
    write_shapes_dataset(root / "images", count=4, size=args.resolution, seed=0, trigger="zwx")
    cfg = load_config(engine_config(files, root / "images", root / "run", args.precision, args.batch,
                                    args.resolution))
    session = Session.open(cfg)
    bare = BareLoop(files["diffusers"], session, args.precision)
    session.step(2)  # warm-up both
    bare.step(), bare.step()
    engine_times, bare_times = [], []
    for _ in range(args.rounds):
        engine_times += [timed(lambda: session.step(1)) for _ in range(args.steps)]
        bare_times += [timed(bare.step) for _ in range(args.steps)]
    e, b = statistics.median(engine_times), statistics.median(bare_times)
    tokens = (args.resolution // 16) ** 2
    print(f"model: hidden {BENCH.heads * BENCH.head_dim}, {BENCH.double_blocks}+{BENCH.single_blocks} blocks, "
          f"context 4096; batch {args.batch}, {tokens} image + 512 text tokens, {args.precision}, "
          f"LoRA r16 dropout 0.1, gradient checkpointing; torch threads {torch.get_num_threads()}")
    print(f"engine median {e:.3f} s/step, bare median {b:.3f} s/step over {len(engine_times)} steps each")
    print(f"ratio engine/bare = {e / b:.3f}")


if __name__ == "__main__":
    main()
