"""Kill a training run with SIGKILL at random points until it finishes; prove it equals an uninterrupted run.

Each attempt runs ``loraloom train CONFIG`` (``cli.main``) in a process forked from a warm fork server
(start-up is seconds here, a fork is milliseconds) and kills it, either from outside at a random moment
(during start-up and restore, mid-step, mid-checkpoint) or at a named point through the test-only fault
plan (``checkpoint.FAULT_PLAN_ENV``). Then the run is resumed, and so on; a last attempt runs to the end.
The tests use :func:`train_with_kills` and :func:`compare_runs` for a short run; this script does a long one::

    python benchmarks/resume_stress.py --kills 60 --steps 48 --seed 1
    python benchmarks/resume_stress.py --checkpoint-figures real-width   # checkpoint size and write time
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
from multiprocessing import forkserver
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from loraloom.training import checkpoint
from loraloom.training.cli import main as cli_main
from loraloom.training.config import load_config
from loraloom.training.metrics import read_metrics

NAMED_POINTS = ("step.after-backward", "checkpoint.file-written", "checkpoint.before-rename",
                "checkpoint.before-retention")
# The fork server reads its environment once, when it starts: one plan file per parent process.
_PLAN = Path(tempfile.gettempdir()) / f"loraloom-fault-plan-{os.getpid()}"


def _context() -> multiprocessing.context.BaseContext:
    """The fork server, started with the fault plan and one thread per child (tiny steps on a shared
    machine are 100x slower with two); this process's own environment is left as it was."""
    ctx = multiprocessing.get_context("forkserver")
    # The adapter modules too: peft and lycoris-lora take seconds to import, in every attempt otherwise.
    ctx.set_forkserver_preload(["loraloom.training.cli", "loraloom.training.session", "loraloom.training.adapters.lora",
                                "loraloom.training.adapters.lycoris"])
    _PLAN.write_text("")
    env = {checkpoint.FAULT_PLAN_ENV: str(_PLAN), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return ctx


def _start(ctx: multiprocessing.context.BaseContext, args: list[str], plan: str = "") -> multiprocessing.Process:
    _PLAN.write_text(plan)
    process = ctx.Process(target=cli_main, args=(args,), daemon=True)
    process.start()
    return process


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_metrics(run_dir) if r["type"] == "step"), default=0)


def _resume_step(run_dir: Path) -> int:
    found = checkpoint.newest_valid_checkpoint(run_dir)
    return json.loads(found[1]["state.json"])["step"] if found else 0


def run_to_end(config: Path, overrides: list[str] = (), timeout: float = 300) -> None:
    """One uninterrupted ``loraloom train`` in a forked process."""
    process = _start(_context(), ["train", str(config), *[f"--set={o}" for o in overrides]])
    process.join(timeout)
    if process.exitcode != 0:
        raise RuntimeError(f"training {config} ended with exit code {process.exitcode}")


def train_with_kills(config: Path, kills: int, seed: int, overrides: list[str] = (),
                     timeout: float = 300) -> list[dict]:
    """SIGKILL ``kills`` attempts of ``loraloom train config`` at random points, then run it to the end.

    Returns one record per attempt: how it was killed, the step it resumed from, the last step it logged.
    """
    ctx, rng = _context(), random.Random(seed)
    cfg = load_config(config, list(overrides))
    run_dir, steps = Path(cfg.output.run_dir), cfg.train.steps
    args = ["train", str(config), *[f"--set={o}" for o in overrides]]
    trials: list[dict] = []
    while len(trials) < kills:
        resumed = _resume_step(run_dir)
        # Near the end only a fault point kills for sure: a forked run of a tiny model can finish its last
        # steps within a timed kill's delay.
        near_end = steps - resumed <= 4
        if near_end or rng.random() < 0.5:
            point = "step.after-backward" if near_end else rng.choice(NAMED_POINTS)
            process = _start(ctx, args, f"{point} {rng.randint(1, 2)}")
            process.join(timeout)
            how = f"at {point}"
        else:
            process = _start(ctx, args)
            if rng.random() < 0.2:
                how = "during start-up or restore"
                time.sleep(rng.uniform(0, 0.2))
            else:
                target = resumed + rng.randint(1, 3)
                while process.is_alive() and _last_step(run_dir) < target:
                    time.sleep(0.005)
                how = f"after step {target}"
                time.sleep(rng.uniform(0, 0.15))
            process.kill()
            process.join(timeout)
        if process.exitcode != -signal.SIGKILL:
            raise RuntimeError(f"attempt {len(trials) + 1} ({how}) was not killed: exit code {process.exitcode}")
        trials.append({"killed": how, "resumed_from": resumed, "last_logged_step": _last_step(run_dir)})
    process = _start(ctx, args)
    process.join(timeout)
    if process.exitcode != 0:
        raise RuntimeError(f"the final attempt ended with exit code {process.exitcode}")
    return trials


def compare_runs(reference: Path, resumed: Path, step: int) -> dict:
    """Max abs difference of the adapters at ``step`` (and of their moving averages, when the run keeps one) and
    of the logged losses; the step records of each."""
    def adapter(run: Path, name: str = "adapter.safetensors") -> dict[str, torch.Tensor]:
        return load_tensors((checkpoint.checkpoint_dir(run) / f"step-{step:08d}" / name).read_bytes())

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "step"}

    a, b = adapter(reference), adapter(resumed)
    if a.keys() != b.keys():
        raise ValueError("the two adapters have different modules")
    la, lb = losses(reference), losses(resumed)
    ema = {}
    if (checkpoint.checkpoint_dir(reference) / f"step-{step:08d}" / "ema.safetensors").is_file():
        ea, eb = adapter(reference, "ema.safetensors"), adapter(resumed, "ema.safetensors")
        ema["ema_max_abs_diff"] = max((ea[k] - eb[k]).abs().max().item() for k in ea)
    return {
        **ema,
        "adapter_max_abs_diff": max((a[k] - b[k]).abs().max().item() for k in a),
        "loss_max_abs_diff": max(abs(la[s] - lb.get(s, float("inf"))) for s in la),
        "reference_steps": [r["step"] for r in read_metrics(reference) if r["type"] == "step"],
        "resumed_steps": [r["step"] for r in read_metrics(resumed) if r["type"] == "step"],
    }


def checkpoint_figures(width: str, folder: Path, repeats: int = 3) -> dict:
    """Size of one checkpoint (LoRA rank 16 on attention + MLP, AdamW moments after one step) and the
    median seconds ``Session.checkpoint`` takes to write it, for the tiny or the real-width Flux."""
    from dataclasses import replace

    from loraloom.training.config import RunConfig
    from loraloom.training.demo_data import write_shapes_dataset
    from loraloom.training.families.flux_kit import REAL_WIDTH, TINY, build, write
    from loraloom.training.session import Session

    files = write(build({"tiny": TINY, "real-width": REAL_WIDTH}[width]), folder / "models",
                             diffusers=False)
    write_shapes_dataset(folder / "images", count=4, size=64, seed=0, trigger="zwx")
    cfg = RunConfig()
    cfg = replace(cfg, model=replace(cfg.model, **{k: str(files[k]) for k in (
                      "diffusion_model", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")},
                      text_length=16),
                  data=replace(cfg.data, images=str(folder / "images"), resolution=64, validation_images=1),
                  train=replace(cfg.train, steps=2, mixed_precision="fp32", gradient_checkpointing=False,
                                checkpoint_every=0, validate_every=0),
                  output=replace(cfg.output, run_dir=str(folder / "run")))
    session = Session.open(cfg)
    session.step(1)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        path = session.checkpoint()
        seconds.append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"width": width, "adapter_parameters": sum(p.numel() for p in session.params),
            "checkpoint_mb": round(size / 2**20, 2),
            "write_seconds_median": round(sorted(seconds)[len(seconds) // 2], 3)}


def main() -> None:
    from loraloom.training import demo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="resume-stress-")))
    parser.add_argument("--checkpoint-figures", choices=["tiny", "real-width"],
                        help="instead of killing runs, measure checkpoint size and write time")
    parser.add_argument("--smoke", action="store_true", help="2 kills in 4 steps: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.kills, args.steps = 2, 4
    if args.checkpoint_figures:
        print(json.dumps(checkpoint_figures(args.checkpoint_figures, args.out), indent=1))
        return
    # The smoke run skips pre-training the demo's base: a random one resumes just as exactly.
    config = demo.prepare(args.out, images=8, steps=args.steps, vae_steps=0, base_steps=0 if args.smoke else 600)
    common = [f"train.steps={args.steps}", "train.checkpoint_every=2", "train.keep_checkpoints=2",
              "train.keep_checkpoint_every=8", "train.validate_every=5", "train.gradient_accumulation=2",
              "train.batch_size=2", "adapter.dropout=0.1"]
    start = time.perf_counter()
    run_to_end(config, [*common, "output.run_dir=straight"])
    straight = time.perf_counter() - start
    start = time.perf_counter()
    trials = train_with_kills(config, args.kills, args.seed, [*common, "output.run_dir=killed"])
    killed = time.perf_counter() - start
    result = compare_runs(args.out / "straight", args.out / "killed", args.steps)
    ok = (result["adapter_max_abs_diff"] <= 1e-6 and result["resumed_steps"] == list(range(1, args.steps + 1))
          and result["reference_steps"] == result["resumed_steps"])
    kinds: dict[str, int] = {}
    for t in trials:
        kind = t["killed"].split(" step ")[0] if t["killed"].startswith("after") else t["killed"]
        kinds[kind] = kinds.get(kind, 0) + 1
    print(json.dumps({"kills": len(trials), "by_kind": kinds, "straight_seconds": round(straight, 1),
                      "killed_seconds": round(killed, 1), "adapter_max_abs_diff": result["adapter_max_abs_diff"],
                      "loss_max_abs_diff": result["loss_max_abs_diff"], "every_step_once": ok}, indent=1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
