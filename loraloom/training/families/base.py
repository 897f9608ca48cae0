"""The contract of a model family: everything that differs between Flux, Lumina 2 and SDXL.

Session, config, CLI, export and nodes reach a family only through :class:`Family`; one module per family
implements it and registers an instance in ``families/__init__.py``. ``tests/test_families.py`` runs every
registered family through the whole contract on its tiny model.

Conventions shared by every family:

- **Latents** are raw VAE latents (B, C, H/f, W/f), the VAE's posterior mean before any scale or shift (what
  ComfyUI's ``VAE.encode`` returns and its LATENT holds). The family applies its latent format inside
  :meth:`Family.noised`, :meth:`Family.sample` and nowhere else.
- **Time** t in [0, 1]: 0 is the clean image, 1 pure noise. A family whose model counts time otherwise
  (Lumina 2 runs from 1 = clean; SDXL counts 1000 discrete steps) converts at its own boundary.
- **Text embeddings** are a dict of tensors per caption, float32, without a batch dimension and with the same
  shapes for every caption of a run (batches are stacked). The keys are the family's own.
- **Module names** are those of the model as the family loads it (diffusers classes); adapter targets are
  regexes over them, and :meth:`Family.export_key` turns them into the names ComfyUI's loaders read.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...loaders.dataset import Geometry
from ..errors import ConfigError
from . import parts

if TYPE_CHECKING:
    from ...loaders.captions import CaptionSettings
    from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig

# The trained model's parts: the denoiser always, a family's text encoders when they are trained too. Adapter
# and checkpoint names are "<component>.<module>".
DENOISER = "diffusion_model"


@dataclass(frozen=True)
class ModelFile:
    """One model file a family reads: the ``model.<slot>`` key that holds its path, and where ComfyUI lists it."""
    slot: str  # a ModelConfig field: diffusion_model, text_encoder, text_encoder_2 or vae
    name: str  # the input's name on the family's model node (clip_l, t5, gemma, ...)
    folder: str  # the ComfyUI models folder its choices come from (its checkpoints are offered too)
    doc: str


@dataclass(frozen=True)
class TokenizerFolder:
    """A tokenizer a text encoder needs: the ``model.<slot>`` key and the folder ComfyUI ships it in."""
    slot: str  # tokenizer or tokenizer_2
    name: str  # the model node's input name
    bundled: str  # the folder inside ComfyUI's ``comfy`` package that holds it
    doc: str


@dataclass
class Noised:
    """A batch made ready for the model: its input, the time, what the model should output, and the weights."""
    inputs: torch.Tensor  # (B, C, h, w) noisy latents in the model's latent format
    noise: torch.Tensor  # (B, C, h, w) the noise drawn (or given) for them
    t: torch.Tensor  # (B,) time in [0, 1]
    target: torch.Tensor  # (B, C, h, w)
    weights: torch.Tensor  # (B,) per-sample loss weights (ones unless the family weights by SNR)


@dataclass
class TinyModel:
    """A randomly initialised model of the family, for tests and the demo: every part as a live module."""
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text: Any  # what :meth:`Family.load_text_encoder` returns, ready for :meth:`Family.encode_text`


@dataclass
class FullSize:
    """The family's released model at full size, for benchmarks and memory figures."""
    denoiser: torch.nn.Module  # the full-size architecture as the family loads it, on the meta device
    vae_factor: int  # pixels per latent side of the family's own VAE
    # One caption's embeddings (no batch dimension), by key: random features, with the masks and counts of the
    # longest caption a default run reads.
    text: dict[str, torch.Tensor]


class Family(ABC):
    """One model family. Class attributes describe it; methods load, encode, noise, predict, sample and export."""

    name: ClassVar[str]  # model.family
    title: ClassVar[str]  # for people: node names, messages
    architecture: ClassVar[str]  # modelspec.architecture of exported files
    files: ClassVar[tuple[ModelFile, ...]]
    tokenizers: ClassVar[tuple[TokenizerFolder, ...]] = ()
    latent_channels: ClassVar[int]
    latent_scale: ClassVar[float]  # the latent format: the model sees (raw latent - shift) * scale
    latent_shift: ClassVar[float] = 0.0
    bucket_divisor: ClassVar[int]  # image sides are multiples of this (VAE factor x patch size)
    caption_format: ClassVar[str]  # data.captions.format "auto" means this: "tags" or "text"
    # adapter.targets presets: regexes (full match) over the denoiser's module names.
    targets: ClassVar[dict[str, str]]
    quantized: ClassVar[str]  # the denoiser's layers model.base_precision = "nf4" stores in 4 bits

    text_length: ClassVar[int]  # model.text_length 0 means this many tokens per caption
    noise_prediction: ClassVar[bool] = False  # a DDPM model (epsilon / v): the SNR-based settings apply
    text_encoders_trainable: ClassVar[bool] = False  # optimizer.text_encoder_lr may train its text encoders
    # With text_encoders_trainable: adapter target regexes (full match) over each text encoder's module names, by
    # component (the text encoder's model slot, as :meth:`text_encoder_modules` names it).
    text_targets: ClassVar[dict[str, str]] = {}
    # The caption whose embeddings :meth:`sample` takes as ``negative`` for classifier-free guidance (families
    # whose model has no guidance input); None: its sample takes no negative.
    negative_caption: ClassVar[str | None] = None
    system_prompt: ClassVar[str] = ""  # model.system_prompt "auto" means this
    # The ModelConfig options the family's model node shows (besides its files), and a line of advice for it.
    node_options: ClassVar[tuple[str, ...]] = ("base_precision", "text_length")
    node_note: ClassVar[str] = ""

    # ---------------------------------------------------------------- configuration

    def resolve(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with every "auto" value set to this family's choice; ConfigError for what it cannot train.

        Settings every family shares are resolved here; :meth:`resolve_train` adds the family's own."""
        model, train = cfg.model, cfg.train
        for key, value in (("data.resolution", cfg.data.resolution), ("sample.resolution", cfg.sample.resolution)):
            if value % self.bucket_divisor:
                raise ConfigError(f"{key} = {value} must be a multiple of {self.bucket_divisor} for {self.title}")
        if cfg.adapter.targets not in self.targets:
            raise ConfigError(f"adapter.targets = {cfg.adapter.targets!r} is not one of {sorted(self.targets)} "
                              f"for {self.title}")
        ddpm_only = {"model.prediction": model.prediction != "auto", "model.zero_terminal_snr": model.zero_terminal_snr,
                     "train.min_snr_gamma": train.min_snr_gamma > 0, "train.noise_offset": train.noise_offset > 0,
                     "train.debiased_estimation": train.debiased_estimation}
        for key, used in ddpm_only.items() if not self.noise_prediction else ():
            if used:
                raise ConfigError(f"{key} is for noise-prediction models; {self.title} is trained by flow matching: "
                                  "leave it at its default")
        if cfg.optimizer.text_encoder_lr and not self.text_encoders_trainable:
            raise ConfigError(f"optimizer.text_encoder_lr: {self.title}'s text encoders are not trained; set it to 0")
        return dataclasses.replace(
            cfg, data=_resolve_caption_format(cfg.data, self.caption_format),
            model=dataclasses.replace(model, text_length=model.text_length or self.text_length,
                                      system_prompt=self.system_prompt if model.system_prompt == "auto"
                                      else model.system_prompt),
            train=self.resolve_train(train))

    @abstractmethod
    def resolve_train(self, train: TrainConfig) -> TrainConfig:
        """``train`` with "auto" timesteps (and other objective settings) made concrete for this family."""

    def for_model(self, model: ModelConfig) -> Family:
        """This family set up for a run's resolved model settings that its training maths reads besides ``train``
        (SDXL: the prediction type and the noise schedule). Families without such settings return themselves."""
        return self

    def warnings(self, cfg: RunConfig) -> list[str]:
        """What a user should know before training ``cfg`` (the session warns with each)."""
        return []

    @abstractmethod
    def example(self) -> dict[str, dict[str, Any]]:
        """What ``loraloom config --example <name>`` sets, by config section: the files where ComfyUI keeps
        them, and the family's recipe (resolution, preview guidance, ...)."""

    # ---------------------------------------------------------------- models

    @abstractmethod
    def load_denoiser(self, model: ModelConfig, dtype: torch.dtype, keep_float8: bool) -> torch.nn.Module:
        """The frozen denoiser from ``model.diffusion_model`` (eval mode, no grad): weights in ``dtype``, linear
        weights stored in float8 kept so when ``keep_float8`` (see :mod:`..precision`)."""

    @abstractmethod
    def load_text_encoder(self, model: ModelConfig, dtype: torch.dtype) -> Any:
        """The frozen text encoder(s) with their tokenizers, on the CPU; an object :meth:`encode_text` takes."""

    @abstractmethod
    def text_encoder_to(self, text: Any, device: torch.device) -> None:
        """Move what :meth:`load_text_encoder` returned to ``device``."""

    @abstractmethod
    def encode_text(self, text: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions → embeddings batched on dim 0 (see the module docstring), as the family's pipeline computes
        them; float32 on the CPU. Families with ``text_encoders_trainable`` compute them differentiably: the
        caller chooses the grad mode."""

    def text_encoder_modules(self, text: Any) -> dict[str, torch.nn.Module]:
        """The text encoders inside what :meth:`load_text_encoder` returned, by component (their model slot), for
        families with ``text_encoders_trainable``: the adapter wraps their :attr:`text_targets`."""
        raise NotImplementedError(f"{self.title}'s text encoders are not trained")

    @abstractmethod
    def load_vae(self, model: ModelConfig) -> torch.nn.Module:
        """The frozen VAE from ``model.vae`` in ``model.vae_precision``."""

    # The three below serve the diffusers AutoencoderKL every family loads; a family overrides what differs.
    def encode_images(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] → raw latents (B, C, H/f, W/f), float32."""
        return parts.encode_images(vae, pixels)

    def decode_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) → pixels (B, 3, h·f, w·f) in [-1, 1], float32."""
        return parts.decode_latents(vae, latents)

    def vae_factor(self, vae: torch.nn.Module) -> int:
        """Pixels per latent along a side."""
        return parts.vae_factor(vae)

    # ---------------------------------------------------------------- training

    @abstractmethod
    def noised(self, latents: torch.Tensor, train: TrainConfig, generator: torch.Generator,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Noised:
        """Raw latents (B, C, h, w) → the model's input, time, target and weights. ``t`` (B,) and ``noise`` fix
        the draws (validation); otherwise both come from ``generator``."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                geometry: list[Geometry], guidance: float) -> torch.Tensor:
        """The model's output for ``inputs`` (B, C, h, w) at ``t`` (B,): comparable with ``Noised.target``,
        float32 (B, C, h, w). ``text`` is batched; ``geometry`` has one entry per sample."""

    @abstractmethod
    def sample(self, model: torch.nn.Module, text: dict[str, torch.Tensor], size: tuple[int, int],
               latent_hw: tuple[int, int], seed: int, steps: int, guidance: float,
               negative: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A preview: ``steps`` sampler steps from the seeded noise of shape (1, C, *latent_hw) for the batched
        ``text``; ``size`` is the picture's (width, height). ``guidance`` is the model's guidance input where it
        has one, else the classifier-free guidance scale against ``negative``: the batched embeddings of
        :attr:`negative_caption` (None, or guidance 1.0: no guidance). Returns raw latents (1, C, h, w)."""

    # ---------------------------------------------------------------- export

    @abstractmethod
    def export_key(self, component: str, module: str) -> str:
        """The name ComfyUI's LoRA loader reads for ``module`` of ``component`` (without the tensor suffix)."""

    @abstractmethod
    def native_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The denoiser's whole state dict (module names as :meth:`load_denoiser` builds it) in the layout of the
        single file ComfyUI's ``diffusion_models`` loader (UNETLoader) reads and :meth:`load_denoiser` loads back.

        Full fine-tunes and merges are written through it. It must be linear in the tensors (renames,
        concatenations, splits, reshapes, permutations only), so that applied to weight differences it gives the
        differences of the native tensors: whole-model patches are written through it too. Tensors are not copied
        where a rename suffices; the input is not changed."""

    @abstractmethod
    def metadata(self, cfg: RunConfig) -> dict[str, str]:
        """kohya ``ss_*`` and modelspec fields that name this family in exported files."""

    # ---------------------------------------------------------------- the tiny-model kit

    @abstractmethod
    def tiny(self, seed: int = 0, words: tuple[str, ...] = (), real_width: bool = False) -> TinyModel:
        """A random model of this family: tiny widths, or the smallest model ComfyUI's detection accepts."""

    @abstractmethod
    def write_tiny(self, tiny: TinyModel, folder: Path, diffusers: bool = True) -> dict[str, Path]:
        """``tiny`` in the file layouts users have. Returns paths by ModelConfig slot (diffusion_model,
        text_encoder, ..., tokenizer folders), plus ``checkpoint`` (an all-in-one file),
        ``diffusion_model_fp8`` (every 2-D weight in float8, as the community's fp8 files) and, with
        ``diffusers``, ``diffusers`` (a diffusers pipeline folder)."""

    def full_size(self) -> FullSize:
        """The released model's architecture and input shapes (``benchmarks/gpu.py``, memory figures).

        A family without one raises NotImplementedError; the benchmarks then skip it."""
        raise NotImplementedError(f"{self.title} describes no full-size model")

    # Adapter tensor suffixes (LyCORIS/kohya names: lora_down.weight, lokr_w1, ...) this family's files spell
    # otherwise, e.g. peft's lora_A / lora_B where the family's exports follow diffusers.
    export_suffixes: ClassVar[dict[str, str]] = {}

    # ---------------------------------------------------------------- ComfyUI's objects (duck-typed, no imports)

    @abstractmethod
    def comfy_text(self, clip: Any, caption: str, length: int, system_prompt: str = "") -> dict[str, torch.Tensor]:
        """One caption through a ComfyUI CLIP object of this family, read literally (no prompt weighting), as
        the engine's embeddings (``system_prompt``: ``model.system_prompt``, for families that read one); raises
        ConfigError when ``clip`` holds another family's text encoders."""

    @abstractmethod
    def comfy_conditioning(self, text: dict[str, torch.Tensor], guidance: float) -> list:
        """ComfyUI CONDITIONING for one caption's embeddings (no batch dimension)."""


def _resolve_caption_format(data: DataConfig, default: str) -> DataConfig:
    """``data`` with every caption format "auto" set to ``default``."""
    def one(captions: CaptionSettings) -> CaptionSettings:
        return dataclasses.replace(captions, format=default) if captions.format == "auto" else captions
    sources = tuple(dataclasses.replace(s, captions=one(s.captions)) for s in data.sources)
    return dataclasses.replace(data, captions=one(data.captions), sources=sources)
