"""LoRA training speed and memory at full size on one GPU, for every registered family with a full-size model.

Each family's released architecture (``Family.full_size``), randomly initialised on the GPU, with a rank-16
LoRA on its default targets, trains through the engine's parts: the family's noising and prediction, the
adapter, fp8 / nf4 storage, block offloading, gradient checkpointing, fused AdamW, gradient clipping and the one
host read per step, as ``Session`` steps (``step_overhead.py`` measures the session's own overhead on a CPU).
For 512² and 1024², batch 1 and 4, bf16 / fp8 / nf4 bases, with and without block offloading it reports:

- s/step: median of the timed steps (after warm-up steps, which include compilation with ``--compile``);
- model TFLOP/step: forward and backward as counted by torch's FlopCounterMode on the meta device, without the
  recomputation of gradient checkpointing; achieved TFLOP/s is that over s/step, and MFU that over the GPU's
  dense bf16 peak (known GPUs, or ``--peak-tflops``); "hw TFLOP/s" counts the recomputation too;
- peak GB: ``torch.cuda.max_memory_allocated`` over warm-up and timed steps, beside the engine's own estimate
  (``model.vram_budget``'s planner) for the same set-up;
- syncs/step: host-device synchronisations of one step, counted by torch's sync debug mode (the step itself
  makes one: the loss and gradient norm read at its end).

Configurations run most important first (bf16 1024² batch 1 for MFU, fp8 and nf4 + offloading for memory)
and stop starting new ones after ``--budget-s`` seconds. Each measurement is written to ``--out`` (JSON lines,
``"measured": true``) and printed as soon as it is taken, so a cut-off run still reports; the FLOPs and the
planner's estimates (shapes only) are computed meanwhile in worker processes on the CPU and joined into the
table printed at the end (and its rows appended to ``--out``). Unattended on one H100/H200 in about 10 minutes::

    python benchmarks/gpu.py --out $OUT/gpu.jsonl
    python benchmarks/gpu.py --smoke        # CPU, the tiny models, one step each: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.training import memory
from loraloom.training.compile import compile_blocks
from loraloom.training.config import AdapterConfig, OptimizerConfig, RunConfig, TrainConfig
from loraloom.training.families import FAMILIES
from loraloom.training.families.base import Family, Geometry
from loraloom.training.offload import BlockOffload
from loraloom.training.optimizers import make_optimizer
from loraloom.training.precision import quantize_nf4, store_float8
from loraloom.training.session import peak_memory_mb, to_device

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "GH200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.1, "RTX 4090": 165.2, "RTX 6000 Ada": 364.2, "B200": 2250.0}
# (precision, offload) in order of importance: the MFU target, then the memory targets, then the rest.
SETUPS = (("bf16", "none"), ("fp8", "none"), ("nf4", "blocks"), ("bf16", "blocks"), ("fp8", "blocks"),
          ("nf4", "none"))


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one family's model sees: latent channels and VAE factor, and one caption's embeddings."""
    channels: int
    vae_factor: int
    text: dict[str, torch.Tensor]


def family_shape(family: Family, smoke: bool) -> Shape:
    if not smoke:
        full = family.full_size()
        return Shape(family.latent_channels, full.vae_factor, full.text)
    tiny = family.tiny(seed=0)
    with torch.no_grad():
        text = family.encode_text(tiny.text, ["a photo"])
    return Shape(family.latent_channels, family.vae_factor(tiny.vae), {k: v[0] for k, v in text.items()})


def meta_model(family: Family, smoke: bool) -> torch.nn.Module:
    """The architecture benchmarked, as the family loads it, on the meta device."""
    if not smoke:
        return family.full_size().denoiser
    return memory.meta_twin(family.tiny(seed=0).denoiser)


def build(family: Family, precision: str, device: torch.device, dtype: torch.dtype, smoke: bool
          ) -> torch.nn.Module:
    """A randomly initialised model on ``device``, stored in ``precision`` (fp8 / nf4) or ``dtype``, initialised
    there: seconds on a GPU, not the minutes of a 12B model's initialisation on the CPU. Every layer gets
    PyTorch's default initialisation (norm scales without one: 1)."""
    model = torch.nn.Module.to(meta_model(family, smoke), dtype).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    model.requires_grad_(False).eval()
    store_float8(model, convert=precision == "fp8")
    if precision == "nf4":
        quantize_nf4(model, family.quantized, dtype, device)
    return model


def adapter_settings(family: Family) -> AdapterConfig:
    default = AdapterConfig().targets
    targets = default if default in family.targets else next(iter(family.targets))
    return AdapterConfig(rank=16, alpha=16.0, targets=targets)


def inputs(shape: Shape, resolution: int, batch: int, device: torch.device) -> tuple:
    """Random latents, the caption's embeddings on ``device`` and the geometry of a batch."""
    side = resolution // shape.vae_factor
    latents = torch.randn(batch, shape.channels, side, side)
    text = {k: to_device(v.expand(batch, *v.shape).contiguous(), device) for k, v in shape.text.items()}
    return latents, text, [Geometry((resolution, resolution), (0, 0), (resolution, resolution))] * batch


def count_flops(family: Family, shape: Shape, resolution: int, batch: int, dtype: torch.dtype, smoke: bool
                ) -> tuple[float, float]:
    """(forward + backward, forward) FLOPs of one training step, without recomputation, on the meta device."""
    twin = torch.nn.Module.to(meta_model(family, smoke), dtype)
    memory.attach_adapter(twin, family, adapter_settings(family))
    side = resolution // shape.vae_factor
    latents = torch.empty(batch, shape.channels, side, side, device="meta", dtype=dtype)
    values = memory.MetaValues()  # the caption's mask or window count, which some families read
    text = values.inputs(shape.text, batch, dtype)
    geometry = [Geometry((resolution, resolution), (0, 0), (resolution, resolution))] * batch
    with values, FlopCounterMode(display=False) as counter:
        pred = family.predict(twin, latents, torch.rand(batch, device="meta"), text, geometry, 1.0)
        forward = counter.get_total_flops()
        pred.float().square().mean().backward()
    return counter.get_total_flops(), forward


def sizes(family: Family, shape: Shape, resolution: int, batch: int, dtype: torch.dtype, smoke: bool
          ) -> memory.Sizes:
    """What the engine's memory planner expects this set-up to need."""
    model = torch.nn.Module.to(meta_model(family, smoke), dtype)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, adapter=adapter_settings(family), train=dataclasses.replace(cfg.train,
                                                                                           batch_size=batch))
    side = resolution // shape.vae_factor
    return memory.measure(model, family, cfg, torch.empty(shape.channels, side, side), shape.text,
                          Geometry((resolution, resolution), (0, 0), (resolution, resolution)), dtype)


def analyse(name: str, resolution: int, batch: int, dtype: torch.dtype, smoke: bool) -> dict:
    """The shape-only figures of one size, computed on the CPU (meta device): FLOPs and the planner's estimates
    per (precision, offload). Runs in worker processes beside the GPU work: a full-size count takes seconds."""
    family = FAMILIES[name]
    shape = family_shape(family, smoke)
    total, forward = count_flops(family, shape, resolution, batch, dtype, smoke)
    planned = sizes(family, shape, resolution, batch, dtype, smoke)
    estimates = {f"{precision}/{offload}/{checkpointing}": memory.estimate(
        planned, "auto" if precision == "bf16" else precision, checkpointing, offload, False)["total"] / 1e9
        for precision, offload in SETUPS for checkpointing in (True, False)}
    return {"total": total, "forward": forward, "estimates": estimates}


class Trainer:
    """The engine's training step on a model: noise, predict, loss, backward, clip, one host read, AdamW."""

    def __init__(self, family: Family, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 device: torch.device, dtype: torch.dtype, data: tuple, total_steps: int):
        self.family, self.model, self.params, self.device = family, model, params, device
        self.latents, self.text, self.geometry = data
        self.train = family.resolve_train(TrainConfig())
        self.optimizer, _ = make_optimizer([{"params": params, "lr": 1e-4}], OptimizerConfig(lr=1e-4), total_steps)
        self.generator = torch.Generator().manual_seed(0)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(self) -> float:
        noised = self.family.noised(self.latents, self.train, self.generator)
        with self.autocast:
            pred = self.family.predict(self.model, to_device(noised.inputs, self.device),
                                       to_device(noised.t, self.device), self.text, self.geometry, 1.0)
            error = (pred.float() - to_device(noised.target, self.device).float()).square().flatten(1).mean(1)
            loss = (error * to_device(noised.weights, self.device)).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        value, _ = torch.stack([loss.detach(), norm.to(loss)]).tolist()  # the step's one host read
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def syncs_per_step(trainer: Trainer) -> int | None:
    """Host-device synchronisations in one step, as torch's CUDA sync debug mode reports them."""
    if trainer.device.type != "cuda":
        return None
    synchronize(trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_one(trainer: Trainer, warmup: int, steps: int) -> dict:
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        trainer.step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        trainer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else peak_memory_mb(device) / 1e3
    return {"s_per_step": statistics.median(times), "peak_gb": round(peak, 2),
            "syncs_per_step": syncs_per_step(trainer)}


def benchmark_family(family: Family, args: argparse.Namespace, device: torch.device, log: Callable[[dict], None],
                     deadline: float) -> list[dict]:
    """Every set-up of :data:`SETUPS` at every size, then (``--compile``) bf16 with compiled blocks at the first
    size (compiling takes minutes, so it comes last). Each measurement is logged as it finishes; the returned
    rows add the shape-only figures (FLOPs, estimates), computed meanwhile in other processes."""
    shape = family_shape(family, args.smoke)
    shapes = [(r, b) for r in args.resolutions for b in args.batches]
    shapes.sort(key=lambda rb: (rb[1], -rb[0]))  # batch 1 first, 1024 before 512
    if args.smoke:
        figures = {rb: _done(analyse(family.name, *rb, args.dtype, args.smoke)) for rb in shapes}
        return [_with_figures(row, figures, device, args) for row in _run_setups(family, args, device, log, deadline,
                                                                                 shape, shapes)]
    # Two threads a worker: the GPU's host thread keeps a core to launch kernels.
    with ProcessPoolExecutor(max_workers=min(4, len(shapes)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(2,)) as pool:
        figures = {rb: pool.submit(analyse, family.name, *rb, args.dtype, args.smoke) for rb in shapes}
        rows = _run_setups(family, args, device, log, deadline, shape, shapes)
        return [_with_figures(row, figures, device, args) for row in rows]


def _run_setups(family: Family, args: argparse.Namespace, device: torch.device, log: Callable[[dict], None],
                deadline: float, shape: Shape, shapes: list[tuple[int, int]]) -> list[dict]:
    dtype, rows = args.dtype, []
    # (precision, offload, gradient checkpointing, compiled, sizes)
    runs = [(precision, offload, True, False, shapes) for precision, offload in SETUPS
            if precision in args.precisions and offload in args.offload]
    if "bf16" in args.precisions and "none" in args.offload:  # the fastest if it fits (an H200 at 1024² has room)
        runs.insert(1, ("bf16", "none", False, False, shapes[:1]))
    if args.compile:
        runs.append(("bf16", "none", True, True, shapes[:1]))
    for precision, offload, checkpointing, compiled, sizes_run in runs:
        setup = {"family": family.name, "precision": precision, "offload": offload, "checkpointing": checkpointing,
                 "compiled": compiled}
        if time.monotonic() > deadline:
            rows.append(_logged(log, {**setup, "skipped": "time budget"}))
            continue
        model = build(family, precision, device, dtype, args.smoke)
        adapter = memory.attach_adapter(model, family, adapter_settings(family))
        if checkpointing:
            model.enable_gradient_checkpointing()
        mover = BlockOffload(model, device) if offload == "blocks" else None
        if compiled:
            compile_blocks(model, Path(args.cache))
        params = [p for ps in adapter.parameters().values() for p in ps]
        for resolution, batch in sizes_run:
            row = {**setup, "resolution": resolution, "batch": batch}
            if time.monotonic() > deadline:
                rows.append(_logged(log, {**row, "skipped": "time budget"}))
                continue
            try:
                trainer = Trainer(family, model, params, device, dtype,
                                  inputs(shape, resolution, batch, device), 1000)
                row.update(run_one(trainer, args.warmup + (2 if compiled else 0), args.steps))
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
            finally:
                for p in params:
                    p.grad = None
                gc.collect()
            rows.append(_logged(log, row))
        if mover is not None:
            mover.remove()
        del model, adapter, params, mover
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _logged(log: Callable[[dict], None], row: dict) -> dict:
    log(row)
    return row


def _with_figures(row: dict, figures: dict[tuple[int, int], Future], device: torch.device,
                  args: argparse.Namespace) -> dict:
    """``row`` with FLOPs, TFLOP/s, MFU and the planner's estimate."""
    if "skipped" in row or "resolution" not in row:
        return row
    shaped = figures[row["resolution"], row["batch"]].result()
    total, forward, seconds = shaped["total"], shaped["forward"], row["s_per_step"]
    peak = peak_tflops(device, args.peak_tflops)
    tflops = total / seconds / 1e12
    recomputed = forward if row["checkpointing"] else 0
    return {**row, "model_tflop_per_step": total / 1e12, "achieved_tflops": tflops,
            "hw_tflops": (total + recomputed) / seconds / 1e12, "mfu": tflops / peak if peak else None,
            "estimate_gb": shaped["estimates"][f"{row['precision']}/{row['offload']}/{row['checkpointing']}"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


COLUMNS = ("family", "precision", "offload", "checkpointing", "compiled", "resolution", "batch", "s_per_step",
           "model_tflop_per_step", "achieved_tflops", "hw_tflops", "mfu", "peak_gb", "estimate_gb", "syncs_per_step")


def cell(value) -> str:
    """A table cell: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table_row(row: dict) -> str:
    if "skipped" in row:
        return "| " + " | ".join(cell(row.get(c, "")) for c in COLUMNS[:7]) + f" | skipped: {row['skipped']} |"
    return "| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |"


def print_flops(args: argparse.Namespace) -> None:
    """Model FLOPs of one training step per family and size, counted on the meta device (any machine)."""
    print("| family | resolution | batch | forward TFLOP | forward + backward | + recomputation |")
    print("|---|---|---|---|---|---|")
    for name in args.families:
        family = FAMILIES[name]
        shape = family_shape(family, args.smoke)
        for resolution in args.resolutions:
            for batch in args.batches:
                total, forward = count_flops(family, shape, resolution, batch, args.dtype, args.smoke)
                print(f"| {name} | {resolution} | {batch} | {forward / 1e12:.3g} | {total / 1e12:.4g} | "
                      f"{(total + forward) / 1e12:.4g} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=sorted(FAMILIES))
    parser.add_argument("--resolutions", nargs="*", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp8", "nf4"])
    parser.add_argument("--offload", nargs="*", default=["none", "blocks"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="last, bf16 without offloading with compiled blocks, at the first size")
    parser.add_argument("--cache", default="/tmp/loraloom-inductor", help="inductor cache root for --compile")
    parser.add_argument("--budget-s", type=float, default=540, help="start no configuration after this many s")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu.jsonl")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models at 64 px in fp32, one step each")
    parser.add_argument("--flops", action="store_true", help="print the model FLOPs per step (CPU) and exit")
    args = parser.parse_args()
    args.dtype = torch.bfloat16
    if args.smoke:  # every set-up once, fast: fp32 (CPUs without bf16 units are slow in bf16), no warm-up
        args.resolutions, args.batches, args.steps, args.warmup, args.dtype = [64], [1], 1, 0, torch.float32
    if args.flops:
        print_flops(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    deadline = time.monotonic() + args.budget_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}; LoRA rank 16; results -> {args.out}", flush=True)

    def write(row: dict) -> None:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def log(row: dict) -> None:  # a measurement as soon as it is taken, in case the run is cut off
        write({"measured": True, **row})
        print("# measured: " + json.dumps(row), flush=True)

    rows = []
    for name in args.families:
        family = FAMILIES[name]
        try:
            family.full_size()  # the families a GPU run measures; the smoke run checks the same ones
        except NotImplementedError as e:
            print(f"# {name}: skipped ({e})")
            continue
        rows += benchmark_family(family, args, device, log, deadline)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        write(row)
        print(table_row(row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
