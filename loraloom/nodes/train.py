"""The Train steps node: advance a named run by N optimizer steps per queue item.

Queue it again and it continues from the run's newest checkpoint; Cancel checkpoints and stops. Nothing is kept
between executions except what the engine wrote in the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ..loaders.files import read_safetensors
from ..training.config import (
    AdapterConfig,
    DataConfig,
    EmaConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    config_from_dict,
)
from ..training.encoders import Encoders
from ..training.metrics import read_metrics
from ..training.session import Session
from . import host
from .encode import EncodedDataset
from .progress import EVENT, ProgressReport
from .runs import CACHE_SUBFOLDER, LossHistory, TrainedRun, run_dir
from .widgets import CATEGORY, widget

log = logging.getLogger(__name__)
GPUS_TOOLTIP = ("GPUs of this machine to train on: one worker process per GPU (started with torchrun, so above 1 "
                "it always trains in worker processes), each on its own share of the batches, so batch_size is "
                "per GPU. Their gradients are averaged every step and every GPU holds the same adapter; the first "
                "writes the run folder and streams the progress. A run continues only with the GPU count it "
                "started with. Without CUDA, that many CPU processes.")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What one execution does besides training: how many steps, and when to draw previews."""
    steps: int
    preview_every: int


def run_config(output_dir: Path, name: str, model: ModelConfig, dataset: DataConfig, adapter: AdapterConfig,
               optimizer: OptimizerConfig, train: TrainConfig, sample: SampleConfig, ema: EmaConfig) -> RunConfig:
    """The engine's run configuration for run ``name`` under ComfyUI's output folder, validated."""
    cfg = RunConfig(
        model=model, data=dataclasses.replace(dataset, cache_dir=str(output_dir / CACHE_SUBFOLDER)),
        adapter=adapter, optimizer=optimizer, train=train, sample=sample, ema=ema,
        output=OutputConfig(run_dir=str(run_dir(output_dir, name)), name=name))
    return config_from_dict(cfg.to_dict())


def advance(session: Session, schedule: Schedule, report: ProgressReport, on_step: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> bool:
    """Train ``schedule.steps`` steps (fewer at the end of the run), then leave a checkpoint of the last one.

    ``stop_requested`` is asked between steps; when it says yes, the run is checkpointed where it is and
    True is returned (Cancel).
    """
    target = min(session.state.step + schedule.steps, session.cfg.train.steps)
    if session.done:
        message = (f"run {report.run!r} already finished its {session.cfg.train.steps} steps: nothing trained. "
                   "Raise total_steps to continue it, or use a new run name.")
        log.warning(message)
        report.state("done", message)
        return False
    report.state("training", f"steps {session.state.step + 1}-{target} of {session.cfg.train.steps}")
    while session.state.step < target:
        session.step(1)
        preview = schedule.preview_every and session.state.step % schedule.preview_every == 0
        if preview and session.cfg.sample.prompts and session.is_main:
            session.preview()
        if stop_requested():
            _save(session, report)
            report.state("cancelled", f"cancelled at step {session.state.step}; queue again to continue")
            return True
        on_step(session.state.step)
    _save(session, report)
    return False


def _save(session: Session, report: ProgressReport) -> None:
    if report.saved_step != session.state.step:
        report.state("saving")
        session.checkpoint()


def train_chunk(cfg: RunConfig, schedule: Schedule, report: ProgressReport, on_step: Callable[[int], None],
                stop_requested: Callable[[], bool], encoders: Encoders | None = None) -> tuple[int, Path] | None:
    """Open the run, advance it, export its adapter: (step, adapter file), or None when cancelled.

    The one training path of both the in-process node and the worker process.
    """
    # ComfyUI runs nodes under inference_mode; training needs autograd back.
    with torch.inference_mode(False), torch.enable_grad():
        session = Session.open(cfg, on_event=report.on_engine_event, encoders=encoders)
        on_step(session.state.step)
        if advance(session, schedule, report, on_step, stop_requested):
            return None
        return session.state.step, session.export()


class TrainSteps:
    DESCRIPTION = ("Advance the run named run_name by steps_per_queue steps each time the prompt is queued; queue "
                   "again to continue it from its checkpoint. Cancel saves a checkpoint and stops.")
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = ("LORALOOM_RUN", "LORA_MODEL", "LORALOOM_LOSS")
    RETURN_NAMES = ("run", "lora", "loss_history")
    OUTPUT_TOOLTIPS = ("The run, for Export / Apply.", "The adapter as trained so far (stock 'Load LoRA Model' "
                       "takes it).", "Training and validation loss so far, for the Loss graph node.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LORALOOM_MODEL",),
            "dataset": ("LORALOOM_DATASET", {"tooltip": "A Dataset node, or Encode dataset to train with ComfyUI's "
                                             "CLIP / VAE and a cache filled ahead."}),
            "adapter": ("LORALOOM_ADAPTER",),
            "optimizer": ("LORALOOM_OPTIMIZER",),
            "run_name": ("STRING", {"default": "my-lora", "tooltip": "The run's folder under "
                                    "output/loraloom/runs/. The same name continues the same run."}),
            "total_steps": widget(TrainConfig, "steps", min=1, max=10_000_000),
            "steps_per_queue": ("INT", {"default": 100, "min": 1, "max": 10_000_000, "tooltip":
                                        "Steps trained each time the prompt is queued."}),
            "batch_size": widget(TrainConfig, "batch_size", min=1, max=1024),
            # Not 'seed': the front end gives an input of that name a randomize-after-queue control, and a
            # changed seed cannot continue a run.
            "training_seed": widget(TrainConfig, "seed", min=0, max=2**31 - 1),
            "guidance": widget(TrainConfig, "guidance", min=0.0, max=100.0),
            "timesteps": widget(TrainConfig, "timesteps"),
            "mixed_precision": widget(TrainConfig, "mixed_precision"),
            "gradient_checkpointing": widget(TrainConfig, "gradient_checkpointing"),
            "checkpoint_every": widget(TrainConfig, "checkpoint_every", min=0, max=10_000_000),
            "validate_every": widget(TrainConfig, "validate_every", min=0, max=10_000_000),
            "preview_every": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip":
                                      "Draw a side-by-side preview every N steps (0: never)."}),
            "preview_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompt of the previews."}),
            "preview_steps": widget(SampleConfig, "steps", min=1, max=200),
            "preview_guidance": widget(SampleConfig, "guidance", min=0.0, max=100.0),
            "worker_process": ("BOOLEAN", {"default": False, "tooltip": "Train in a separate Python process "
                                           "(same engine, progress streamed back): a crash there cannot take "
                                           "ComfyUI down. Its log is worker.log in the run folder."}),
        }, "optional": {
            "gpus": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": GPUS_TOOLTIP}),
            "min_snr_gamma": widget(TrainConfig, "min_snr_gamma", min=0.0, max=100.0),
            "noise_offset": widget(TrainConfig, "noise_offset", min=0.0, max=1.0, step=0.0001),
            "compile": widget(TrainConfig, "compile"),
            "ema_decay": widget(EmaConfig, "decay", min=0.0, max=0.99999, step=0.0001),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # NaN never equals itself: every queue item trains, never a cached result

    def train(self, model: ModelConfig, dataset: DataConfig | EncodedDataset, adapter: AdapterConfig,
              optimizer: OptimizerConfig, run_name: str, total_steps: int, steps_per_queue: int, batch_size: int,
              training_seed: int, guidance: float, timesteps: str, mixed_precision: str, gradient_checkpointing: bool,
              checkpoint_every: int, validate_every: int, preview_every: int, preview_prompt: str, preview_steps: int,
              preview_guidance: float, worker_process: bool = False, gpus: int = 1, min_snr_gamma: float = 0.0,
              noise_offset: float = 0.0, compile: bool = False, ema_decay: float = 0.0, unique_id: str = ""):
        encoders = None
        if isinstance(dataset, EncodedDataset):
            dataset, encoders = dataset.for_training(model, worker_process or gpus > 1)
        output_dir = host.output_dir()
        train = TrainConfig(steps=total_steps, batch_size=batch_size, seed=training_seed, guidance=guidance,
                            timesteps=timesteps, mixed_precision=mixed_precision,
                            gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
                            validate_every=validate_every, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset,
                            compile=compile)
        prompts = (preview_prompt.strip(),) if preview_prompt.strip() else ()
        sample = SampleConfig(prompts=prompts, seeds=(training_seed,), steps=preview_steps, guidance=preview_guidance)
        cfg = run_config(output_dir, run_name, model, dataset, adapter, optimizer, train, sample,
                         EmaConfig(decay=ema_decay))
        report = ProgressReport(str(unique_id), run_name, total_steps, output_dir, partial(host.send_progress, EVENT))
        return execute(cfg, Schedule(steps_per_queue, preview_every), report,
                       host.progress_bar(total_steps, str(unique_id)), in_worker=worker_process, gpus=gpus,
                       encoders=encoders)


def execute(cfg: RunConfig, schedule: Schedule, report: ProgressReport, bar, in_worker: bool = False,
            gpus: int = 1, encoders: Encoders | None = None):
    """Train a chunk of the run, in this process or in workers (always with several GPUs); the node's outputs."""
    report.state("loading")
    host.free_models()
    try:
        if in_worker or gpus > 1:
            from .worker import train_in_worker

            done = train_in_worker(cfg, schedule, report, bar.update_absolute, host.interrupted, gpus, encoders)
        else:
            done = train_chunk(cfg, schedule, report, bar.update_absolute, host.interrupted, encoders)
        if done is None:  # Cancel was pressed and the run checkpointed: end the prompt as ComfyUI does
            host.raise_if_interrupted()
            raise RuntimeError(f"run {report.run!r} stopped at a checkpoint on request")
    except Exception as e:
        if report.last_state != "cancelled":
            report.state("error", str(e))
        raise
    step, adapter_file = done
    run_folder = Path(cfg.output.run_dir)
    run = TrainedRun(report.run, run_folder, step, cfg.train.steps, adapter_file)
    history = LossHistory.from_records(read_metrics(run_folder))
    if report.last_state != "done":
        report.state("done", f"step {step} of {cfg.train.steps}" +
                     ("" if step >= cfg.train.steps else "; queue again to continue"))
    return run, read_safetensors([adapter_file], what="the exported adapter"), history
