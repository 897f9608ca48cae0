"""A full fine-tune against LoRA on the same tiny Flux: trained parameters, checkpoint size and CPU step time.

Three sessions on one model and dataset (fp32, batch 2, 64² images, all_linear layers, AdamW): LoRA rank 16, a full
fine-tune, and the full fine-tune with a moving average ([ema] decay 0.999). Their steps are interleaved in rounds,
so a busy machine slows all three alike; the median and the fastest step time of each are reported with their
ratios to LoRA (on a shared machine the fastest is the least disturbed)::

    python benchmarks/full_finetune.py --rounds 4 --steps 3
    python benchmarks/full_finetune.py --smoke   # one round of one step: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from loraloom.training.config import RunConfig, config_from_dict
from loraloom.training.demo_data import write_shapes_dataset
from loraloom.training.families.flux_kit import TINY, build, write
from loraloom.training.session import Session

KINDS = {
    "lora rank 16": {"adapter": {"algorithm": "lora", "rank": 16, "alpha": 16.0}},
    "full": {"adapter": {"algorithm": "full"}},
    "full + ema": {"adapter": {"algorithm": "full"}, "ema": {"decay": 0.999}},
}


def _config(folder: Path, files: dict[str, Path], run: str, sections: dict) -> RunConfig:
    data = RunConfig().to_dict()
    data["model"].update({k: str(files[k]) for k in ("diffusion_model", "text_encoder", "text_encoder_2", "tokenizer",
                                                     "tokenizer_2", "vae")}, text_length=16)
    data["data"].update(images=str(folder / "images"), resolution=64, validation_images=1,
                        cache_dir=str(folder / "cache"))
    data["adapter"].update(targets="all_linear")
    data["train"].update(steps=10_000, batch_size=2, mixed_precision="fp32", gradient_checkpointing=False,
                         checkpoint_every=0, validate_every=0)
    data["output"].update(run_dir=str(folder / run))
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return config_from_dict(data)


def measure(folder: Path, rounds: int, steps: int) -> dict:
    files = write(build(TINY), folder / "models", diffusers=False)
    write_shapes_dataset(folder / "images", count=8, size=64, seed=0, trigger="zwx")
    sessions = {name: Session.open(_config(folder, files, f"run{i}", kind)) for i, (name, kind) in
                enumerate(KINDS.items())}
    for session in sessions.values():
        session.step(1)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name] += [r["step_time"] for r in session.step(steps)]
    result = {}
    lora = statistics.median(times["lora rank 16"])
    for name, session in sessions.items():
        ckpt = session.checkpoint()
        exports = session.run_dir / "export"
        exports.mkdir()
        session.export(exports / "out.safetensors")  # every file: adapter or patch + model, EMA copies
        step = statistics.median(times[name])
        result[name] = {
            "trained_parameters": sum(p.numel() for p in session.params),
            "model_parameters": sum(p.numel() for p in session.denoiser.parameters()),
            "checkpoint_mb": round(sum(f.stat().st_size for f in ckpt.iterdir()) / 2**20, 2),
            "exported_files": sorted(f.name for f in exports.iterdir()),
            "export_mb_bf16": round(sum(f.stat().st_size for f in exports.iterdir()) / 2**20, 2),
            "median_step_s": round(step, 4), "step_time_vs_lora": round(step / lora, 2),
            "fastest_step_s": round(min(times[name]), 4),
            "fastest_vs_lora": round(min(times[name]) / min(times["lora rank 16"]), 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round of one step")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps = 1, 1
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(Path(folder), args.rounds, args.steps), indent=1))


if __name__ == "__main__":
    main()
