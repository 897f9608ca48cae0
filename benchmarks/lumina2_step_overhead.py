"""Lumina 2: engine step time divided by a bare diffusers + peft loop's, and adapter sizes per target preset.

Step time: the smallest real-width Lumina 2 (dim 2304, 24/8 heads, 2 + 2 refiner blocks, 1 layer; the family's
``tiny(real_width=True)``) trained by the engine's ``Session.step`` and by a hand-written loop over diffusers'
own ``Lumina2Transformer2DModel`` (split q/k/v) with peft, interleaved in rounds so that load on a shared machine
hits both alike; same batch, precision, LoRA (rank 16, dropout 0.1, attention + MLP: the engine's on the fused
qkv, the bare loop's on to_q / to_k / to_v), gradient checkpointing, image and caption. The figure is the ratio
of medians.

Presets: LoRA parameters at rank 16 and the base parameters they adapt, per ``adapter.targets`` preset, for the
full Lumina-Image-2.0 (26 layers), counted on a meta-device model (nothing allocated).

    python benchmarks/lumina2_step_overhead.py [--rounds 4] [--steps 2] [--precision fp32] [--resolution 128]
    python benchmarks/lumina2_step_overhead.py --presets
    python benchmarks/lumina2_step_overhead.py --smoke   # the tiny model, one step a loop, and the presets
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.training.config import RunConfig, load_config, to_toml
from loraloom.training.demo_data import write_shapes_dataset
from loraloom.training.families import family, flux_vae, lumina2
from loraloom.training.families.lumina2_layout import config_from_native, transformer_from_native
from loraloom.training.objectives import flow_match_inputs, sample_timesteps
from loraloom.training.session import Session

LUMINA = family("lumina2")
RANK = 16
SPLIT_TARGETS = (r"^(layers|noise_refiner|context_refiner)\.\d+\."  # attention_mlp on diffusers' split q/k/v
                 r"(attn\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.linear_[123])$")


def engine_config(files: dict, images: Path, run: Path, precision: str, resolution: int, text_length: int) -> Path:
    cfg = RunConfig()
    cfg = replace(
        cfg,
        model=replace(cfg.model, family="lumina2", diffusion_model=str(files["diffusion_model"]),
                      text_encoder=str(files["text_encoder"]), vae=str(files["vae"]), text_length=text_length),
        data=replace(cfg.data, images=str(images), resolution=resolution, validation_images=1),
        adapter=replace(cfg.adapter, rank=RANK, alpha=16.0, dropout=0.1, targets="attention_mlp"),
        train=replace(cfg.train, steps=10_000, batch_size=1, mixed_precision=precision, gradient_checkpointing=True,
                      checkpoint_every=0, validate_every=0),
        output=replace(cfg.output, run_dir=str(run)),
    )
    path = run.parent / "bench.toml"
    path.write_text(to_toml(cfg))
    return path


class BareLoop:
    """What a user would write with diffusers and peft: diffusers' model and pipeline convention (the network
    is fed 1 - t and predicts x0 - noise), the reference the engine must match."""

    def __init__(self, native: dict[str, torch.Tensor], session: Session):
        from diffusers import Lumina2Transformer2DModel

        self.dtype = session.compute_dtype
        self.model = Lumina2Transformer2DModel(**config_from_native(native)).to(self.dtype)
        self.model.load_state_dict(transformer_from_native(native, fused_qkv=False))
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.1, target_modules=SPLIT_TARGETS))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.model.enable_gradient_checkpointing()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        item = session.val_items[0]  # the held-out image and its caption
        self.x0 = flux_vae.scale_latents(item.latent[None])
        n = int(item.text["mask"].sum())
        self.caption, self.mask = item.text["gemma"][None, :n], item.text["mask"][None, :n].long()
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        noise = torch.randn(self.x0.shape, generator=self.generator)
        t = sample_timesteps("shift", 1, self.generator, shift=lumina2.SHIFT)
        xt, target = flow_match_inputs(self.x0, noise, t)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(hidden_states=xt, timestep=1 - t, encoder_hidden_states=self.caption,
                             encoder_attention_mask=self.mask, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(-out.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_overhead(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="loraloom-lumina2-bench-") as scratch:  # gigabytes of model files
        root = Path(scratch)
        files = LUMINA.write_tiny(LUMINA.tiny(seed=0, real_width=not args.smoke), root / "models", diffusers=False)
        write_shapes_dataset(root / "images", count=2, size=args.resolution, seed=0, trigger="zwx")
        session = Session.open(load_config(engine_config(files, root / "images", root / "run", args.precision,
                                                         args.resolution, args.text_length)))
        bare = BareLoop({k: v.float() for k, v in load_file(files["diffusion_model"]).items()}, session)
        session.step(1)  # warm-up both
        bare.step()
        engine_times, bare_times = [], []
        for _ in range(args.rounds):
            engine_times += [timed(lambda: session.step(1)) for _ in range(args.steps)]
            bare_times += [timed(bare.step) for _ in range(args.steps)]
        e, b = statistics.median(engine_times), statistics.median(bare_times)
        print(f"model: dim 2304, 24/8 heads, 2+2 refiners, 1 layer; batch 1, {(args.resolution // 16) ** 2} image + "
              f"{bare.caption.shape[1]} caption tokens, {args.precision}, LoRA r{RANK} dropout 0.1 attention+MLP, "
              f"gradient checkpointing; torch threads {torch.get_num_threads()}")
        print(f"engine median {e:.3f} s/step, bare median {b:.3f} s/step over {len(engine_times)} steps each")
        print(f"ratio engine/bare = {e / b:.3f}")


def presets() -> None:
    """LoRA and adapted base parameters per preset, on Lumina-Image-2.0's architecture (26 layers)."""
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel

    with init_empty_weights():
        model = Lumina2Transformer2DModel(cap_feat_dim=2304)  # otherwise diffusers' defaults are Lumina-Image-2.0's
    lumina2.fuse_qkv(model)
    total = sum(p.numel() for p in model.parameters())
    print(f"Lumina-Image-2.0 transformer: {total / 1e9:.3f} B parameters")
    for preset, pattern in lumina2.TARGETS.items():
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
        base = sum(m.weight.numel() for m in linears)
        lora = sum(RANK * (m.in_features + m.out_features) for m in linears)
        print(f"{preset}: {len(linears)} modules, {base / 1e6:.1f} M base parameters adapted, "
              f"{lora / 1e6:.2f} M LoRA parameters at rank {RANK}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps of each loop per round")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--text-length", type=int, default=256)
    parser.add_argument("--presets", action="store_true", help="only count the adapter sizes per preset")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 64 px, 16 tokens, one step a loop, "
                        "then the presets: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.resolution, args.text_length = 1, 1, 64, 16
        step_overhead(args)
        presets()
    elif args.presets:
        presets()
    else:
        step_overhead(args)


if __name__ == "__main__":
    main()
