"""Engine step time divided by ComfyUI's built-in trainer's (``TrainLoraNode``), both measured in one process.

The same real-width Flux (3072 wide, 24 heads of 128, context 4096; 1 double + 1 single block, the smallest
model ComfyUI's detection accepts), the same cached latents and text embeddings (ComfyUI gets the engine's
embeddings as its CONDITIONING), batch 1, fp32 (CPUs without bf16 units are slow in bf16), LoRA rank 16, AdamW at
1e-4, gradient checkpointing, no dropout. ComfyUI's node adapts every weight (linears, plus differences on
norms and biases); the engine adapts every linear of the blocks (``adapter.targets = "all_linear"``).

ComfyUI's node runs all its steps in one call, after a set-up; its per-step times are the intervals between
its loss callbacks (one per step, after backward), so the set-up is left out. Rounds alternate one node call
and as many engine steps, so load on a shared machine hits both alike; the figure is the ratio of medians.

It needs a ComfyUI checkout and a Python that runs it: ``COMFYUI_PATH`` and ``COMFYUI_PYTHON`` (the host tests'
variables). This script starts itself again under that Python with this checkout first on its path::

    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python \\
        python benchmarks/comfy_vs_engine.py [--rounds 3] [--steps 3] [--resolution 256] [--text-length 512]
    ... python benchmarks/comfy_vs_engine.py --smoke   # 64 px, 16 tokens, one round of two steps
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def outer(args: argparse.Namespace, argv: list[str]) -> None:
    """Run the measurement under COMFYUI_PYTHON, with this checkout's loraloom first on the path."""
    comfy, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON", sys.executable)
    if not comfy:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to the Python that runs it)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([python, __file__, "--inner", *argv], env=env, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode:
        raise SystemExit(f"the measurement failed under {python}:\n{result.stderr[-4000:]}")


def inner(args: argparse.Namespace) -> None:
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, comfy_path)
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    from comfy_flux_predict import stub_torchvision_if_missing

    stub_torchvision_if_missing()
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd
    import comfy_extras.nodes_train as nodes_train
    import torch

    from loraloom.training.config import RunConfig, config_from_dict
    from loraloom.training.demo_data import write_shapes_dataset
    from loraloom.training.families import family
    from loraloom.training.session import Session

    flux = family("flux")
    work = Path(args.work or tempfile.mkdtemp(prefix="loraloom-comfy-vs-engine-"))
    files = flux.write_tiny(flux.tiny(seed=0, real_width=True), work / "models", diffusers=False)
    write_shapes_dataset(work / "images", count=4, size=args.resolution, seed=0, trigger="zwx")
    cfg = RunConfig().to_dict()
    cfg["model"].update({k: str(files[k]) for k in ("diffusion_model", "text_encoder", "text_encoder_2",
                                                     "tokenizer", "tokenizer_2", "vae")}, text_length=args.text_length)
    cfg["data"].update(images=str(work / "images"), resolution=args.resolution, validation_images=0,
                       cache_dir=str(work / "cache"))
    cfg["adapter"].update(rank=16, alpha=16.0, targets="all_linear")
    cfg["optimizer"].update(lr=1e-4, scheduler="constant", weight_decay=0.01)
    cfg["train"].update(steps=100_000, batch_size=1, mixed_precision="fp32", gradient_checkpointing=True,
                        checkpoint_every=0, validate_every=0)
    cfg["output"].update(run_dir=str(work / "run"))
    session = Session.open(config_from_dict(cfg))

    # ComfyUI trains on the engine's cached latents and embeddings: the same data on both sides.
    items = session.val_items
    latents = {"samples": torch.stack([item.latent for item in items])}
    positive = [c for item in items for c in flux.comfy_conditioning(item.text, 1.0)]
    model = comfy.sd.load_diffusion_model(str(files["diffusion_model"]), model_options={"dtype": torch.float32})
    stamps: list[float] = []
    original = nodes_train.TrainSampler.__init__

    def timed_init(self, *a, loss_callback=None, **kw):
        def callback(loss):
            stamps.append(time.perf_counter())
            if loss_callback:
                loss_callback(loss)
        original(self, *a, loss_callback=callback, **kw)

    nodes_train.TrainSampler.__init__ = timed_init
    node = nodes_train.TrainLoraNode()

    def comfy_steps(n: int) -> list[float]:
        stamps.clear()
        node.train(model=model, latents=latents, positive=positive, batch_size=1, steps=n + 1,
                   grad_accumulation_steps=1, learning_rate=1e-4, rank=16, optimizer="AdamW", loss_function="MSE",
                   seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=True,
                   existing_lora="[None]")
        return [b - a for a, b in itertools.pairwise(stamps)]

    def engine_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            session.step(1)
            times.append(time.perf_counter() - start)
        return times

    session.step(1)  # warm-up (ComfyUI's first step is left out by its intervals)
    comfy_times, engine_times = [], []
    for _ in range(args.rounds):
        comfy_times += comfy_steps(args.steps)
        engine_times += engine_steps(args.steps)
    c, e = statistics.median(comfy_times), statistics.median(engine_times)
    print(f"model: real-width Flux 1+1 blocks (ComfyUI detects {type(model.model).__name__}); batch 1, "
          f"{(args.resolution // 16) ** 2} image + {args.text_length} text tokens, fp32, LoRA r16, gradient "
          f"checkpointing; torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"engine median {e:.3f} s/step, ComfyUI TrainLoraNode median {c:.3f} s/step over {len(engine_times)} "
          f"and {len(comfy_times)} steps")
    print(f"ratio engine/ComfyUI = {e / c:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps of each trainer per round")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-length", type=int, default=512)
    parser.add_argument("--work", help="folder for the model files, images and runs (default: a new temporary one)")
    parser.add_argument("--smoke", action="store_true", help="64 px, 16 tokens, one round of two steps")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.resolution, args.text_length = 1, 2, 64, 16
    if args.inner:
        inner(args)
    else:
        outer(args, [a for a in argv if a != "--inner"])


if __name__ == "__main__":
    main()
