"""SDXL: engine step time divided by a bare diffusers + peft loop's on the same real-width model, and the size of
what each ``adapter.targets`` preset adapts.

The model is the family's real-width kit: the smallest UNet ComfyUI detects as SDXL-family (320 channels at every
level, transformer depths 0/1/2, context 2048, adm 2816; 115.5M parameters). Both loops train the same LoRA (rank
16, dropout 0.1, attention + MLP) with the same batch, resolution, precision, 77-token text and gradient
checkpointing, epsilon prediction on uniform steps; their steps are interleaved in rounds so that load on a shared
machine hits both alike, and the figure is the ratio of medians.

    python benchmarks/sdxl_step_overhead.py [--rounds 6] [--steps 2] [--resolution 256]
    python benchmarks/sdxl_step_overhead.py --presets   # parameter counts per preset (no training)
    python benchmarks/sdxl_step_overhead.py --smoke     # the tiny model, one step a loop, and the presets
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.training.adapters.base import LAYERS, select_targets
from loraloom.training.config import MODEL_FILES, AdapterConfig, config_from_dict, load_config, to_toml
from loraloom.training.demo_data import write_shapes_dataset
from loraloom.training.families import family, sdxl
from loraloom.training.families.base import DENOISER
from loraloom.training.families.sdxl_kit import REAL_WIDTH, unet_config
from loraloom.training.session import Session

SDXL = family("sdxl")
RANK = 16
# stabilityai/stable-diffusion-xl-base-1.0's UNet and text encoders, built on the meta device for counting.
SDXL_BASE_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def engine_config(files: dict, images: Path, run: Path, precision: str, resolution: int) -> Path:
    cfg = config_from_dict({
        "model": {"family": "sdxl", **{s: str(files[s]) for s in MODEL_FILES if s in files}, "text_length": 77},
        "data": {"images": str(images), "resolution": resolution, "validation_images": 0},
        "adapter": {"rank": RANK, "alpha": float(RANK), "dropout": 0.1, "targets": "attention_mlp"},
        "optimizer": {"lr": 1e-4, "weight_decay": 0.01, "scheduler": "constant"},
        "train": {"steps": 10_000, "batch_size": 1, "mixed_precision": precision, "gradient_checkpointing": True,
                  "checkpoint_every": 0, "validate_every": 0},
        "output": {"run_dir": str(run)}})
    path = run.parent / "bench.toml"
    path.write_text(to_toml(cfg))
    return path


class BareLoop:
    """What a user would write by hand with diffusers and peft: the reference the engine must match."""

    def __init__(self, folder: Path, session: Session):
        self.model = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True,
                                                          torch_dtype=session.compute_dtype)
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.1,
                                          target_modules=sdxl.TARGETS["attention_mlp"]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.model.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.dtype = session.compute_dtype
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        item = session.val_items[0]
        self.x0 = item.latent[None] * sdxl.LATENT_SCALE
        self.context = item.text["context"][None, :77]
        self.cond = {"text_embeds": item.text["pooled"][None], "time_ids": sdxl.size_ids([item.geometry])}
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        noise = torch.randn(self.x0.shape, generator=self.generator)
        t = torch.randint(0, 1000, (1,), generator=self.generator)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(self.scheduler.add_noise(self.x0, noise, t), t, self.context,
                             added_cond_kwargs=self.cond).sample
            loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="loraloom-sdxl-bench-") as scratch:  # gigabytes of model files
        root = Path(scratch)
        files = SDXL.write_tiny(SDXL.tiny(seed=0, real_width=not args.smoke), root / "models")
        write_shapes_dataset(root / "images", count=2, size=args.resolution, seed=0, trigger="zwx")
        session = Session.open(load_config(engine_config(files, root / "images", root / "run", args.precision,
                                                         args.resolution)))
        bare = BareLoop(files["diffusers"], session)
        session.step(2)  # warm-up both
        bare.step(), bare.step()
        engine_times, bare_times = [], []
        for _ in range(args.rounds):
            engine_times += [timed(lambda: session.step(1)) for _ in range(args.steps)]
            bare_times += [timed(bare.step) for _ in range(args.steps)]
        e, b = statistics.median(engine_times), statistics.median(bare_times)
        print(f"model: SDXL-family UNet {sum(p.numel() for p in session.denoiser.parameters()) / 1e6:.1f}M "
              f"(with LoRA); batch 1 at {args.resolution}px, 77 text tokens, {args.precision}, LoRA r{RANK} "
              f"dropout 0.1 attention_mlp, gradient checkpointing; torch threads {torch.get_num_threads()}")
        print(f"engine median {e:.3f} s/step, bare median {b:.3f} s/step over {len(engine_times)} steps each")
        print(f"ratio engine/bare = {e / b:.3f}")


def presets() -> None:
    """Adapted modules, their base weights and LoRA rank-16 weights for each preset (and the text encoders)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        models = {"SDXL base UNet (2567M)": UNet2DConditionModel(**SDXL_BASE_UNET),
                  "real-width kit UNet (115.5M)": UNet2DConditionModel(**unet_config(REAL_WIDTH))}
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
    print("| model | preset | modules (linear + conv) | base weights adapted | LoRA r16 weights (linear only / "
          "linear + conv) |")
    print("|---|---|---|---|---|")
    rows = [(name, preset, {DENOISER: model}, {DENOISER: pattern}) for name, model in models.items()
            for preset, pattern in sdxl.TARGETS.items()]
    rows.append(("SDXL text encoders (CLIP-L 12 + CLIP-G 32 layers)", "text_encoder_lr > 0",
                 {"text_encoder": clip_l, "text_encoder_2": clip_g}, SDXL.text_targets))
    for name, preset, components, patterns in rows:
        targets = select_targets(components, patterns, AdapterConfig(rank=RANK), LAYERS)
        linear = [t for t in targets if isinstance(t.module, torch.nn.Linear)]
        base = sum(t.module.weight.numel() for t in targets)

        def lora(ts: list) -> int:
            return sum(RANK * (t.module.weight[0].numel() + t.module.weight.shape[0]) for t in ts)
        print(f"| {name} | {preset} | {len(linear)} + {len(targets) - len(linear)} | {base / 1e6:.1f}M | "
              f"{lora(linear) / 1e6:.2f}M / {lora(targets) / 1e6:.2f}M |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="steps of each loop per round")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--presets", action="store_true", help="print parameter counts per preset and stop")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 64 px, one step a loop, then the "
                        "presets: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.resolution = 1, 1, 64
        overhead(args)
        presets()
    elif args.presets:
        presets()
    else:
        overhead(args)


if __name__ == "__main__":
    main()
