"""A training run you can step N at a time, checkpoint, resume, export and observe.

The CLI and the ComfyUI nodes both drive this API::

    session = Session.open(cfg)        # loads, caches encodings, resumes from the newest checkpoint
    session.step(100)                   # or session.run() to the end
    session.export()
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import random
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..loaders.files import fingerprint, writable_folder
from ..loaders.images import save_png, to_pil
from ..loaders.sampler import SamplerPosition
from . import adapters, checkpoint, distributed, memory, offload
from .compile import compile_blocks
from .config import MODEL_FILES, ConfigError, RunConfig, config_from_dict, current_key, plain_file_name, to_toml
from .data import split_and_sample, training_data
from .ema import Ema
from .encoders import CachedEncoders, Encoders, FamilyImageEncoder
from .export import EXPORT_DTYPES, companion, kohya_metadata, read_adapter_file, write_exports
from .families import family
from .families.base import DENOISER, Geometry
from .metrics import MetricsLog
from .objectives import validation_timesteps
from .offline import import_hub_askers_offline
from .optimizers import make_optimizer
from .precision import DTYPES, quantize_nf4, store_float8

log = logging.getLogger(__name__)
Event = dict[str, Any]
VALIDATION_TIMESTEPS = 4
# Model files are compared by content (fingerprints.json), so a run folder moved with its models resumes.
# Keys a resume may change: they do not alter what the next step computes. Any other changed key (base
# model, adapter shape, batch size, lr, data settings, including keys added later) refuses the resume.
CHANGEABLE_ON_RESUME = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                        "train.keep_checkpoint_every", "train.nonfinite_patience", "train.validate_every",
                        "train.log_every", "train.gradient_checkpointing", "train.compile", "model.guidance_distilled",
                        "model.offload", "model.offload_activations", "adapter.init_from",
                        "data.images", "data.cache_dir", "data.workers", "sample.", "output.", "ema.preview",
                        *(f"model.{name}" for name in MODEL_FILES))
# What each rank keeps of its own: data position, noise, dropout and host RNGs. Rank 0's under these names (as
# in a single process), rank r's as "rank<r>-<name>", all in the one checkpoint folder.
RANK_FILES = ("state.json", "rng.safetensors", "host_rng.json")
RANK_SEED_STRIDE = 1000  # rank r seeds its RNGs from train.seed + 1000 r: its own noise, timesteps and dropout


class NonFiniteError(ValueError):
    """Too many steps in a row with a NaN/inf loss or gradient: the run stopped, its last checkpoint intact."""


@dataclasses.dataclass
class TrainState:
    """Where the run is: everything besides weights, optimizer and RNGs that the next step depends on.

    Checkpoints are taken between optimizer steps only (an interrupted step is undone), so the
    gradient-accumulation position is always a whole step and ``samples_seen`` fixes the next micro-batch.
    """
    step: int = 0
    samples_seen: int = 0  # images trained on so far (this rank)
    sampler: dict[str, int] = dataclasses.field(default_factory=lambda: SamplerPosition().to_dict())  # this rank's
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nonfinite_streak: int = 0  # of those, how many in a row up to now
    world_size: int = 1  # processes training the run: another count would deal the batches differently


@dataclasses.dataclass
class Item:
    """One encoded training example: raw latent (C, h, w), text embeddings (empty while the text encoders train:
    the caption is encoded at each step) and where its pixels came from."""
    latent: torch.Tensor
    text: dict[str, torch.Tensor]
    geometry: Geometry
    caption: str = ""


class Session:
    def __init__(self, cfg: RunConfig, run_dir: Path, on_event: Callable[[Event], None] | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.family = family(cfg.model.family).for_model(cfg.model)
        # optimizer.text_encoder_lr trains the family's text encoders (the config refuses it where they cannot).
        self.trains_text = cfg.optimizer.text_encoder_lr > 0
        self.text_model = None  # the text encoders being trained, when they are
        self.device = default_device()
        self.compute_dtype = DTYPES[cfg.train.mixed_precision]
        self.metrics = MetricsLog(run_dir)
        self.on_event = on_event
        self.rank, world = distributed.rank_and_world()
        self.is_main = self.rank == 0  # the rank that writes the run folder
        self.state = TrainState(world_size=world)
        seed = cfg.train.seed + RANK_SEED_STRIDE * self.rank  # rank 0 draws as a single process does
        self.generator = torch.Generator().manual_seed(seed)  # noise and timesteps
        self.torch_rng = _seeded_rng_states(seed + 1)  # dropout; the host's RNG is left alone
        self.host_rng = _seeded_host_rng_states(seed + 2)  # python and numpy, likewise
        self._ahead: tuple[dict, tuple[dict, list[Item]]] | None = None  # a batch read early: (position, read)

    # ------------------------------------------------------------ set-up

    @classmethod
    def open(cls, cfg: RunConfig, on_event: Callable[[Event], None] | None = None,
             encoders: Encoders | None = None) -> Session:
        """Build the run in ``cfg.output.run_dir``; continue from its newest valid checkpoint if any.

        ``encoders``: text and/or image encoders to use instead of the family's own (see :mod:`.encoders`).
        """
        import_hub_askers_offline()
        cfg = config_from_dict(cfg.to_dict())  # validated, its "auto" values resolved by the family
        adapters.check(cfg.adapter)  # before the data and models load
        run_dir = writable_folder(cfg.output.run_dir, "output.run_dir")
        self = cls(cfg, run_dir, on_event)
        for message in self.family.warnings(cfg):
            warnings.warn(message, stacklevel=2)
        self._load_data(encoders or Encoders())
        self._load_model()
        found = self._newest_checkpoint()
        if found:
            self._restore(*found)
        else:
            if cfg.adapter.init_from:
                self._start_from_file(Path(cfg.adapter.init_from))
            if self.is_main:
                self.metrics.truncate_after(0)
        return self

    def _newest_checkpoint(self) -> tuple[Path, dict[str, bytes]] | None:
        """Rank 0 picks the checkpoint (repairing interrupted writes); every rank then reads that one."""
        found = checkpoint.newest_valid_checkpoint(self.run_dir) if self.is_main else None
        folder = distributed.from_main(found[0] if found else None)
        if folder is None or found:
            return found
        files = checkpoint.verified_files(folder)
        if files is None:
            raise RuntimeError(f"rank {self.rank} cannot read the checkpoint {folder} that rank 0 chose: "
                               "output.run_dir must be a folder every rank sees")
        return folder, files

    def _start_from_file(self, path: Path) -> None:
        """A new run continues from the adapter file ``path`` (adapter.init_from)."""
        try:
            groups = read_adapter_file(path, self.family, self.adapter.targets)
        except ValueError as e:  # the message names the file
            raise ConfigError(f"adapter.init_from: {e}") from None
        try:
            self.adapter.load_export(groups)
        except ValueError as e:
            raise ConfigError(f"adapter.init_from = {path}: {e}") from None
        if self.ema:  # the average starts where training starts: at the file's weights
            self.ema = Ema(self.params, self.cfg.ema)
        fresh = sorted(set(self.adapter.targets) - groups.keys())
        if fresh:
            warnings.warn(f"adapter.init_from = {path} holds {len(groups)} of this run's {len(self.adapter.targets)} "
                          f"adapted layers; the other {len(fresh)} (e.g. {fresh[0]}) start from adapter.init_seed",
                          stacklevel=3)

    def _load_data(self, given: Encoders) -> None:
        cfg = self.cfg
        if self.trains_text and given.text is not None:
            raise ConfigError("optimizer.text_encoder_lr trains the model's own text encoders, not a given one: "
                              "leave the clip input of Encode dataset unconnected, or set text_encoder_lr to 0")
        self.cache_root = cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.run_dir.parent / "cache"
        with distributed.main_first():  # the other ranks read the index rank 0 cached
            self.data = data = training_data(cfg, cache_root)
        # Model files are fingerprinted once, here: the caches are keyed by them and checkpoints compare them.
        self.encoding = coding = CachedEncoders(self.family, cfg.model, cache_root, given, self.device)
        self.model_fingerprints = dict(coding.fingerprints)
        coding.encode_latents(data, cfg.data)  # drops images that do not decode, before the first step
        self.train_rows, val_rows, self.sampler = split_and_sample(cfg, data)
        held_out = len(val_rows) if cfg.data.validation_images else 0
        # Texts that never change (or their K variants) are encoded once; per-step ones at each step. Text
        # encoders being trained encode every caption at every step instead.
        per_step = cfg.data.caption_variants == 0 and data.any_varies(self.train_rows)
        fixed = [t for r in self.train_rows for t in data.variant_captions(r)]
        val_texts = [data.fixed_caption(r) for r in val_rows]
        negative = [] if self.family.negative_caption is None else [self.family.negative_caption]
        prompts = list(dict.fromkeys([*cfg.sample.prompts, *negative])) if cfg.sample.prompts else []
        if not self.trains_text:
            coding.cache_texts(list(dict.fromkeys(fixed + val_texts + prompts)))
        if not per_step or self.trains_text:
            coding.text.release()  # everything the run reads is cached: no text encoder stays in memory
        unflipped = [False] * len(val_rows)
        val_latents = coding.latents(data, val_rows, unflipped)
        self.val_items = [Item(*item) for item in zip(val_latents, self._embed(val_texts),
                                                      data.geometry(val_rows, unflipped), val_texts)]
        self.sample_texts = dict(zip(prompts, self._embed(prompts)))
        # Previews decode with the family's VAE, also when another image encoder made the latents.
        self.preview_vae = (coding.image if isinstance(coding.image, FamilyImageEncoder)
                            else FamilyImageEncoder(self.family, cfg.model, self.device))
        self.dataset_fingerprint = data.fingerprint({**data.settings_dict(), "held_out": held_out})
        summary = data.summary()
        self._emit({"type": "dataset", "train": len(self.train_rows), "validation": len(val_rows),
                    "held_out": held_out, "skipped": summary["skipped"], "buckets": summary["buckets"]})

    def _load_model(self) -> None:
        cfg, family = self.cfg, self.family
        precision = "auto" if cfg.model.vram_budget else cfg.model.base_precision  # a budget picks auto/fp8/nf4
        storage = self.compute_dtype if precision in ("auto", "fp8", "nf4") else DTYPES[precision]
        model = family.load_denoiser(cfg.model, storage, keep_float8=precision in ("auto", "fp8"))
        self.memory_plan = plan = self._memory_plan(model)
        store_float8(model, convert=plan.base_precision == "fp8")  # before the adapter wraps the layers
        if plan.base_precision == "nf4":
            quantize_nf4(model, family.quantized, self.compute_dtype, self.device)
        components, patterns = {DENOISER: model}, {DENOISER: family.targets[cfg.adapter.targets]}
        if self.trains_text:
            self.text_model = family.load_text_encoder(cfg.model, storage)
            encoders = family.text_encoder_modules(self.text_model)
            components.update(encoders)
            patterns.update({name: family.text_targets[name] for name in encoders})
        self.adapter = adapters.attach(components, patterns, cfg.adapter, cfg.adapter.init_seed)
        self.adapted_modules = sorted(self.adapter.targets)
        if plan.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # Offloaded blocks stay in CPU memory, everything else goes to the device.
        self.block_offload = offload.BlockOffload(model, self.device) if plan.offload == "blocks" else None
        self.denoiser = model if self.block_offload else model.to(self.device)
        self.activation_offload = offload.ActivationOffload(self.device) if plan.offload_activations else None
        if cfg.train.compile:
            compile_blocks(model, self.cache_root)
        if self.text_model is not None:
            family.text_encoder_to(self.text_model, self.device)
        self.trained_modules = list(components.values())
        groups = self.adapter.parameters()
        self.params = [p for params in groups.values() for p in params]
        self.ema = Ema(self.params, cfg.ema) if cfg.ema.decay else None
        # The denoiser at optimizer.lr, text encoders (when trained) at optimizer.text_encoder_lr.
        lrs = {name: cfg.optimizer.lr if name == DENOISER else cfg.optimizer.text_encoder_lr for name in groups}
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": params, "lr": lrs[name]} for name, params in groups.items()], cfg.optimizer, cfg.train.steps)
        self.base_fingerprint = self.model_fingerprints["model.diffusion_model"] = fingerprint(
            cfg.model.diffusion_model)

    def _memory_plan(self, model: torch.nn.Module) -> memory.MemoryPlan:
        """The run's settings, or with ``model.vram_budget`` what fits it (measured on one training example)."""
        if not self.cfg.model.vram_budget:
            plan = memory.configured(self.cfg)
        else:
            example = self.val_items[0]
            try:
                sizes = memory.measure(model, self.family, self.cfg, example.latent, example.text,
                                       example.geometry, self.compute_dtype)
            except (NotImplementedError, RuntimeError) as e:  # a value read from a meta tensor
                raise ConfigError(
                    f"model.vram_budget cannot estimate {self.family.title}: its model reads values it computes "
                    f"while it runs, which the meta-device estimate does not have ({e}). Set model.vram_budget = 0 "
                    "and choose model.base_precision, train.gradient_checkpointing and model.offload by hand") from None
            plan = memory.plan(self.cfg.model.vram_budget, sizes,
                               quantize=self.cfg.adapter.algorithm not in adapters.WHOLE_MODEL)
            if not plan.fits:
                warnings.warn(f"model.vram_budget: {plan.reason}", stacklevel=3)
        self._emit({"type": "memory_plan", **plan.to_dict()})
        return plan

    # ------------------------------------------------------------ training

    @property
    def done(self) -> bool:
        return self.state.step >= self.cfg.train.steps

    def step(self, n: int = 1) -> list[Event]:
        """Train up to ``n`` optimizer steps (fewer at the end of the run); returns their metrics."""
        records = []
        for _ in range(n):
            if self.done:
                break
            records.append(self._train_step())
            every = self.cfg.train
            if every.validate_every and self.state.step % every.validate_every == 0 and self.is_main:
                self.validate()
            if self.done or (every.checkpoint_every and self.state.step % every.checkpoint_every == 0):
                self.checkpoint()
        return records

    def run(self) -> Path:
        """Train to the configured step count, then export; returns the adapter file."""
        while not self.done:
            self.step(1)
        return self.export()

    def _train_step(self) -> Event:
        before = copy.deepcopy(self.state), self.generator.get_state()
        try:
            # The RNG contexts save the advanced states only when the step completes.
            with _rng_states(self.torch_rng), _host_rng_states(self.host_rng):
                record = self._train_step_inner()
        except BaseException:
            if self.state.step == before[0].step:
                # Interrupted before the update (ComfyUI Cancel, Ctrl-C): undo the data position and noise
                # draws, so a checkpoint taken now resumes exactly at this step.
                self.state, _ = before
                self.generator.set_state(before[1])
                self.optimizer.zero_grad(set_to_none=True)
            raise
        if self.state.nonfinite_streak >= self.cfg.train.nonfinite_patience:
            raise NonFiniteError(
                f"{self.state.nonfinite_streak} steps in a row (up to step {self.state.step}) had a NaN/inf loss "
                f"or gradient and were skipped; stopping. The last checkpoint in "
                f"{checkpoint.checkpoint_dir(self.run_dir)} is intact: lower optimizer.lr, check the data, or use "
                "train.mixed_precision = 'fp32', then resume.")
        return record

    def _train_step_inner(self) -> Event:
        start = time.perf_counter()
        self._train_mode(True)
        accumulation = self.cfg.train.gradient_accumulation
        total = torch.zeros((), device=self.device)
        last = self.state.step + 1 >= self.cfg.train.steps
        for micro in range(accumulation):
            with self._autocast(), offload.activations(self.activation_offload):
                loss = self._loss(self._next_batch()) / accumulation
            loss.backward()
            total += loss.detach()
            if not (last and micro == accumulation - 1):  # the run's last batch has none after it to read
                self._read_ahead()  # the host reads the next batch while the device still runs this backward
        checkpoint.fault_point("step.after-backward")
        total = distributed.average_gradients(self.params, total)  # ranks now agree on gradients and loss
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        mean_loss, grad_norm = torch.stack([total, grad_norm.to(total)]).tolist()  # one host sync per step
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.state.nonfinite_streak = 0
        else:  # skip the update: one bad batch must not poison the weights or the optimizer's moments
            self.state.skipped_steps += 1
            self.state.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.ema and self.ema.due(self.state.step):
            self.ema.update(self.params, self.state.step)
        record = {"type": "step", "step": self.state.step, "loss": mean_loss if finite else None, "lr": lr,
                  "grad_norm": grad_norm if finite else None, "step_time": time.perf_counter() - start,
                  "peak_memory_mb": peak_memory_mb(self.device)}
        if not finite:
            record["skipped"] = f"non-finite {'loss' if not math.isfinite(mean_loss) else 'gradient norm'}"
        if self.state.step % self.cfg.train.log_every == 0 or self.done or not finite:
            self._emit(record)
        return record

    def _train_mode(self, on: bool) -> None:
        """train() or eval() on the denoiser and the text encoders being trained (their adapter dropout follows)."""
        for module in self.trained_modules:
            module.train(on)

    def _next_batch(self) -> list[Item]:
        """The next batch of the bucket sampler (one bucket, this rank's share); O(1) to resume anywhere."""
        position = self.state.sampler
        ahead, self._ahead = self._ahead, None
        after, items = ahead[1] if ahead is not None and ahead[0] == position else self._read_batch(position)
        self.state.sampler = after
        self.state.samples_seen += len(items)
        return items

    def _read_ahead(self) -> None:
        """Read the batch at the current position now; :meth:`_next_batch` takes it if the position still
        matches. Reading is a pure function of the position (no RNG is drawn), so the run is unchanged. A failure
        is left for :meth:`_next_batch` to raise, at the step that needs the batch."""
        position = dict(self.state.sampler)
        try:
            self._ahead = position, self._read_batch(position)
        except Exception:  # raised again, in its place, when the batch is read for use
            self._ahead = None

    def _read_batch(self, position: dict[str, int]) -> tuple[dict[str, int], list[Item]]:
        """The batch at sampler ``position`` and the position after it."""
        ids, where, after = self.sampler.next_batch(SamplerPosition(**position))
        data, rows = self.data, self.train_rows[ids]
        flips = data.flips(rows, where.epoch)
        latents = self.encoding.latents(data, rows, flips)
        texts = data.captions_at(rows, where.epoch, self.sampler.global_batch(where))
        # Per-step captions are encoded fresh and not stored: they would fill the cache with one-off texts.
        store = self.cfg.data.caption_variants > 0 or not data.any_varies(rows)
        items = [Item(*item) for item in zip(latents, self._embed(texts, store), data.geometry(rows, flips), texts)]
        return after.to_dict(), items

    def _embed(self, texts: list[str], store: bool = True) -> list[dict[str, torch.Tensor]]:
        """Each text's embeddings from the cache (encoding the missing ones); none while the text encoders
        train, since their embeddings change at every step (see :meth:`_text`)."""
        return [{} for _ in texts] if self.trains_text else self.encoding.embed(texts, store)

    def _text(self, batch: list[Item]) -> dict[str, torch.Tensor]:
        """The batch's text embeddings on the device: the cached ones stacked, or its captions encoded now (with
        gradients when the caller records them) by the text encoders being trained."""
        if self.text_model is None:
            return {k: to_device(torch.stack([b.text[k] for b in batch]), self.device) for k in batch[0].text}
        return self.family.encode_text(self.text_model, [b.caption for b in batch])

    def _loss(self, batch: list[Item], t: torch.Tensor | None = None, noise: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The family's weighted loss on ``batch``; ``t`` and ``noise`` fix the draws (validation)."""
        noised = self.family.noised(torch.stack([b.latent for b in batch]), self.cfg.train, self.generator, t, noise)
        text = self._text(batch)
        pred = self.family.predict(self.denoiser, to_device(noised.inputs, self.device),
                                   to_device(noised.t, self.device), text, [b.geometry for b in batch],
                                   self.cfg.train.guidance)
        error = (pred.float() - to_device(noised.target, self.device).float()).square().flatten(1).mean(1)
        return (error * to_device(noised.weights, self.device)).mean()

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def validate(self) -> float:
        """Loss on the held-out images at fixed timesteps with fixed noise: comparable across steps and runs."""
        self._train_mode(False)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1)
        losses = []
        for item in self.val_items:
            for t in validation_timesteps(VALIDATION_TIMESTEPS):
                noise = torch.randn((1, *item.latent.shape), generator=gen)  # the raw latent's shape
                with self._autocast():
                    losses.append(self._loss([item], t.view(1), noise).item())
        value = sum(losses) / len(losses)
        self._emit({"type": "validation", "step": self.state.step, "val_loss": value})
        return value

    # ------------------------------------------------------------ prediction and previews

    def _weights(self, adapter: bool, ema: bool):
        """The context that puts the wanted weights in the model: the trained ones, their moving average (``ema``)
        or the base alone (not ``adapter``)."""
        if not adapter:
            return self.adapter.disabled()
        if ema:
            if not self.ema:
                raise ConfigError("there is no moving average to use: set ema.decay (e.g. 0.999) before training")
            return self.ema.applied(self.params)
        return nullcontext()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor], guidance: float,
                adapter: bool = True, geometry: list[Geometry] | None = None, ema: bool = False) -> torch.Tensor:
        """The family's prediction for model inputs ``x`` (B, C, h, w) at ``t`` (B,) and batched ``text``, with the
        trained weights, their moving average (``ema``) or without the adapter. ``geometry`` defaults to whole,
        uncropped pictures of the training resolution."""
        res = self.cfg.data.resolution
        geometry = geometry or [Geometry((res, res), (0, 0), (res, res))] * len(x)
        self._train_mode(False)
        with self._autocast(), self._weights(adapter, ema):
            return self.family.predict(self.denoiser, x, t, text, geometry, guidance)

    @torch.no_grad()
    def sample(self, prompt: str, seed: int, adapter: bool = True, steps: int | None = None,
               guidance: float | None = None, ema: bool = False) -> Image.Image:
        """One preview image for a prompt of ``sample.prompts``: with the trained weights, their moving average
        (``ema``) or without the adapter."""
        s = self.cfg.sample
        res = s.resolution or self.cfg.data.resolution
        vae = self.preview_vae.vae
        f = self.family.vae_factor(vae)
        self._train_mode(False)
        with self._autocast(), self._weights(adapter, ema):
            caption = self.family.negative_caption
            negative = None if caption is None else self.prompt_text(caption)
            raw = self.family.sample(self.denoiser, self.prompt_text(prompt), (res, res), (res // f, res // f), seed,
                                     steps or s.steps, s.guidance if guidance is None else guidance, negative)
        return to_pil(self.family.decode_latents(vae, raw)[0])

    @torch.no_grad()
    def prompt_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """A prompt's embeddings (batch 1) as the model reads them now: from the cache (every sample prompt of the
        config is there), or by the text encoders being trained, with their adapter unless it is disabled."""
        if self.text_model is not None:
            return self.family.encode_text(self.text_model, [prompt])
        return {k: v[None] for k, v in self.sample_texts[prompt].items()}

    def preview(self) -> Path:
        """Side-by-side picture of every sample prompt and seed without and with the adapter, and with its moving
        average when ``ema.preview`` (call on rank 0)."""
        from .preview import side_by_side

        s = self.cfg.sample
        if not s.prompts:
            raise ConfigError("sample.prompts is empty: add at least one prompt to make previews")
        rows = [(p, seed) for p in s.prompts for seed in s.seeds]
        kinds = [("base model", False, False), (f"trained (step {self.state.step})", True, False)]
        if self.ema and self.cfg.ema.preview:
            kinds.append((f"EMA (step {self.state.step})", True, True))
        columns = {name: [self.sample(p, seed, adapter=flag, ema=ema) for p, seed in rows]
                   for name, flag, ema in kinds}
        picture = side_by_side(columns, [f"seed {seed}: {p[:40]}" for p, seed in rows])
        path = save_png(picture, self.run_dir / "samples" / f"step-{self.state.step:08d}.png")
        self._emit({"type": "preview", "step": self.state.step, "path": str(path)})
        return path

    # ------------------------------------------------------------ checkpoint, resume, export

    def checkpoint(self) -> Path:
        """Write everything the next step depends on; the previous checkpoint stays until this one is whole.

        With several ranks every rank must call it at the same step: each sends its own state (RANK_FILES)
        to rank 0, which writes the one folder. The adapter and optimizer are the same on every rank.
        """
        rng = {"noise": self.generator.get_state(), **self.torch_rng}
        own = {"state.json": json.dumps(dataclasses.asdict(self.state)).encode(),
               "rng.safetensors": save_tensors(rng), "host_rng.json": json.dumps(self.host_rng).encode()}
        ranks = distributed.gather_to_main(own)
        path = checkpoint.step_folder(self.run_dir, self.state.step)
        if ranks is not None:
            opt = io.BytesIO()
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, opt)
            files = {
                "adapter.safetensors": save_tensors(self.adapter.state()),
                **({"ema.safetensors": save_tensors(self.ema.state())} if self.ema else {}),
                "optimizer.pt": opt.getvalue(),
                **{_rank_file(name, rank): data for rank, theirs in enumerate(ranks) for name, data in theirs.items()},
                "config.toml": to_toml(self.cfg, comments=False).encode(),
                "config.json": json.dumps(self.cfg.to_dict()).encode(),
                "fingerprints.json": json.dumps({**self.model_fingerprints,
                                                 "data.images": self.dataset_fingerprint}).encode(),
            }
            train = self.cfg.train
            path = checkpoint.write_checkpoint(self.run_dir, self.state.step, files, train.keep_checkpoints,
                                               train.keep_checkpoint_every)
        self._emit({"type": "checkpoint", "step": self.state.step, "path": str(path)})
        return path

    def _restore(self, folder: Path, files: dict[str, bytes]) -> None:
        self._check_resume_config(json.loads(files["config.json"]), folder)
        # Checkpoints written before fingerprints and host RNGs were recorded resume without them.
        self._check_fingerprints(json.loads(files.get("fingerprints.json", b"{}")), folder)
        state = load_tensors(files["adapter.safetensors"])
        if not any(key.startswith(f"{DENOISER}.") for key in state):  # written before names had components
            state = {f"{DENOISER}.{key}": value for key, value in state.items()}
        self.adapter.load_state(state)
        if self.ema:
            self.ema.load_state(load_tensors(files["ema.safetensors"]))
        opt = torch.load(io.BytesIO(files["optimizer.pt"]), weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        saved = TrainState(**json.loads(files["state.json"]))
        if saved.world_size != self.state.world_size:
            raise ConfigError(
                f"the checkpoint {folder} was trained by {saved.world_size} process(es), this run has "
                f"{self.state.world_size}: another count deals the batches differently. Resume with --gpus "
                f"{saved.world_size} (the Train steps node's gpus input), or use a new output.run_dir.")
        own = {name: files[mine] for name in RANK_FILES if (mine := _rank_file(name, self.rank)) in files}
        rng = load_tensors(own["rng.safetensors"])
        self.generator.set_state(rng.pop("noise"))
        self.torch_rng = rng
        if "host_rng.json" in own:
            self.host_rng = json.loads(own["host_rng.json"])
        self.state = TrainState(**json.loads(own["state.json"]))
        if self.is_main:
            self.metrics.truncate_after(self.state.step)
        self._emit({"type": "resume", "step": self.state.step, "path": str(folder)})

    def _check_resume_config(self, saved: dict, folder: Path) -> None:
        adapter = saved.get("adapter", {})
        if "dropout_on" not in adapter:  # saved before the choice existed: peft's input dropout was the only form
            saved = {**saved, "adapter": {**adapter, "dropout_on": "input" if adapter.get("dropout") else "rank"}}
        old, new = _flatten(config_from_dict(saved).to_dict()), _flatten(self.cfg.to_dict())
        for key in sorted(old.keys() | new.keys()):
            if not key.startswith(CHANGEABLE_ON_RESUME) and old.get(key) != new.get(key):
                raise ConfigError(
                    f"{key} changed from {old.get(key)!r} to {new.get(key)!r} since the checkpoint {folder}; "
                    f"resuming would train something else. Restore it, or use a new output.run_dir.")

    def _check_fingerprints(self, saved: dict[str, str], folder: Path) -> None:
        """Different content, at the same path or another: a swapped model file or edited images/captions."""
        current = {**self.model_fingerprints, "data.images": self.dataset_fingerprint}
        saved = {current_key(key): value for key, value in saved.items()}
        for key in sorted(saved.keys() | current.keys() if saved else ()):  # a file added or dropped counts too
            value = saved.get(key, "none")
            if current.get(key, "none") != value:
                raise ConfigError(
                    f"{key}: the content changed since the checkpoint {folder} (fingerprint {value} -> "
                    f"{current.get(key, 'none')}; a different model file, or images/captions added, removed or "
                    f"edited). Restore it, or use a new output.run_dir to train on the new content.")

    def export(self, path: str | Path | None = None, dtype: str = "bf16") -> Path:
        """Write the adapter for ComfyUI's LoraLoader and diffusers, with kohya-style metadata; returns its path.

        A whole-model adapter writes a diff patch there (the LoraLoader applies it as any adapter) and the whole
        model as ``<stem>-model.safetensors`` (ComfyUI's diffusion_models layout). With a moving average, the same
        files again from the averaged weights, as ``<stem>-ema...``. Rank 0 writes them (every rank holds the same
        weights); every rank returns the path.
        """
        if path is None and not plain_file_name(self.cfg.output.name):
            raise ConfigError(f"output.name {self.cfg.output.name!r} must be a plain file name (no '/', '\\' or "
                              f"'..'): it would be written outside {self.run_dir}")
        path = Path(path) if path else self.run_dir / f"{self.cfg.output.name}.safetensors"
        meta = kohya_metadata(self.cfg, self.state.step, self.base_fingerprint, self.family,
                              self.adapter.metadata())
        kinds = [(path, nullcontext())]
        if self.ema:
            kinds.append((companion(path, "ema"), self.ema.applied(self.params)))
        written: list[Path] = []
        for where, weights in kinds:
            with weights:
                if self.is_main:
                    written += write_exports(where, self.adapter, self.denoiser, self.family, EXPORT_DTYPES[dtype],
                                             meta)
        self._emit({"type": "export", "step": self.state.step, "path": str(path),
                    "files": [str(p) for p in written]})
        return path

    def _emit(self, event: Event) -> None:
        """Log ``event`` (rank 0) and pass it to ``on_event`` (every rank, so front ends decide alike)."""
        event = {"time": time.time(), **event}
        if self.is_main:
            self.metrics.write(event)
        if self.on_event:
            self.on_event(event)


@dataclasses.dataclass(frozen=True)
class EncodeSummary:
    """What :func:`encode_data` did."""
    images: int  # records that decoded
    skipped: dict[str, int]  # records left out, by reason
    latents_encoded: int
    latents_cached: int  # found in the cache
    texts_encoded: int
    texts_cached: int
    per_step_captions: bool  # captions change every step: training needs a text encoder, not only the cache


def encode_data(cfg: RunConfig, encoders: Encoders | None = None) -> EncodeSummary:
    """Fill the caches with the latents and text embeddings a run of ``cfg`` reads, without opening the run.

    Texts: every record's fixed caption (validation may pick any record) and caption variants, and the sample
    prompts. Captions that change every step cannot be encoded ahead; ``per_step_captions`` says so.
    """
    cfg = config_from_dict(cfg.to_dict())
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.run_dir).parent / "cache"
    data = training_data(cfg, root)
    coding = CachedEncoders(family(cfg.model.family), cfg.model, root, encoders or Encoders(), default_device())
    coding.encode_latents(data, cfg.data)
    texts = [t for r in range(len(data)) for t in (*data.variant_captions(r), data.fixed_caption(r))]
    coding.cache_texts(list(dict.fromkeys(texts + list(cfg.sample.prompts))))
    coding.text.release()
    latents, text = coding.latent_cache, coding.text_cache
    return EncodeSummary(len(data), dict(data.skipped), latents.misses, latents.hits, text.misses, text.hits,
                         cfg.data.caption_variants == 0 and data.any_varies(range(len(data))))


def _rank_file(name: str, rank: int) -> str:
    return name if rank == 0 else f"rank{rank}-{name}"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. From the host to a GPU through pinned memory without blocking: a plain copy
    from pageable memory would make the host wait for all queued GPU work."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_devices() -> list[int]:
    """The GPU this process trains on: each rank keeps its own device's RNG and never touches the others."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _seeded_rng_states(seed: int) -> dict[str, torch.Tensor]:
    """Global RNG states (CPU and this process's CUDA device) as after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        return _current_rng_states()


def _seeded_host_rng_states(seed: int) -> dict[str, list]:
    """Python's and numpy's global RNG states as after seeding both with ``seed``, as JSON-ready lists."""
    return {"python": list(random.Random(seed).getstate()),
            "numpy": _numpy_state_as_list(np.random.RandomState(seed).get_state(legacy=True))}


def _numpy_state_as_list(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), pos, has_gauss, cached]


@contextmanager
def _host_rng_states(states: dict[str, list]) -> Iterator[None]:
    """Like :func:`_rng_states` for python's ``random`` and numpy's global RNG."""
    host = random.getstate(), np.random.get_state()
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    try:
        yield
        states.update(python=list(random.getstate()), numpy=_numpy_state_as_list(np.random.get_state()))
    finally:
        random.setstate(host[0])
        np.random.set_state(host[1])


def _current_rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    states.update({f"cuda{i}": torch.cuda.get_rng_state(i) for i in _cuda_devices()})
    return states


@contextmanager
def _rng_states(states: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run with the global RNGs set to ``states`` (updated in place afterwards); the caller's are restored."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.set_rng_state(states["torch"])
        for i in _cuda_devices():
            torch.cuda.set_rng_state(states[f"cuda{i}"], i)
        yield
        states.update(_current_rng_states())


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
