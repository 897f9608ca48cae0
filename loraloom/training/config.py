"""One typed run configuration, stored as TOML.

Every field carries its documentation in ``metadata["doc"]``; the example config and the error messages
are generated from it, so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..loaders.buckets import BucketSettings
from ..loaders.captions import CaptionSettings
from ..loaders.sources import SourceSettings
from .adapters import ALGORITHMS, WHOLE_MODEL
from .errors import ConfigError, optional_module  # noqa: F401 (part of this module's interface)
from .families import DEFAULT_FAMILY, family

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    family: str = doc("Model family: one of `loraloom config --example`'s choices.", DEFAULT_FAMILY)
    diffusion_model: str = doc(
        "The diffusion model (transformer or UNet): a single .safetensors file in the layout ComfyUI reads "
        "(bf16/fp16/fp8), an all-in-one checkpoint (its model.diffusion_model. part is read) or a diffusers folder "
        "(the model root or its subfolder).",
        "",
    )
    text_encoder: str = doc("The first text encoder: a .safetensors file, an all-in-one checkpoint or a folder.", "")
    text_encoder_2: str = doc(
        "The second text encoder, for families with two: a .safetensors file, an all-in-one checkpoint or a "
        "folder.", "")
    tokenizer: str = doc(
        "Tokenizer folder of the first text encoder. Empty: the text_encoder folder itself (or its sibling "
        "tokenizer/), or the tokenizer the file carries.", ""
    )
    tokenizer_2: str = doc(
        "Tokenizer folder of the second text encoder. Empty: the text_encoder_2 folder itself (or its sibling "
        "tokenizer_2/).", ""
    )
    vae: str = doc("The VAE: a single file (LDM or diffusers keys), an all-in-one checkpoint or a diffusers folder.",
                   "")
    base_precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "nf4"] = doc(
        "Storage precision of the frozen base. 'auto' keeps fp8 files in fp8 and stores the rest in the "
        "compute dtype; 'fp8' stores every linear weight in float8_e4m3fn and computes in the compute dtype; "
        "'nf4' stores the blocks' linear weights in 4-bit NormalFloat (QLoRA, bitsandbytes): about a quarter of "
        "bf16's memory, a little slower and less exact.",
        "auto",
    )
    offload: Literal["none", "blocks"] = doc(
        "'blocks': keep the frozen base's repeated blocks in CPU memory and copy each to the GPU while it runs, "
        "the next one ahead on a side stream (block swapping). Saves most of the base's GPU memory at the cost of "
        "two copies of it over PCIe per step; needs train.gradient_checkpointing. The result is the same.",
        "none")
    offload_activations: bool = doc(
        "Keep what autograd saves for backward (with gradient checkpointing: each block's input) in CPU memory, "
        "copied out and back on a side stream. The result is the same.", False)
    vram_budget: float = doc(
        "GPU memory to fit, in GB (8, 12, 16, 24, 48, 80, ...; 0: off). When set, the run chooses "
        "base_precision, train.gradient_checkpointing, offload and offload_activations itself: the fastest "
        "set-up whose measured estimate fits, in the order bf16, + checkpointing, fp8, nf4, + block offloading, "
        "+ activation offloading. The choice is logged (a memory_plan event in metrics.jsonl).", 0.0)
    vae_precision: Literal["fp32", "bf16", "fp16"] = doc(
        "Precision of the VAE that encodes the images (once, into the cache) and decodes previews. fp16 only with "
        "a VAE made safe for it (an fp16-fix VAE): others overflow to NaN.", "fp32")
    guidance_distilled: bool = doc(
        "Mark the base as guidance-distilled (its guidance input was distilled from classifier-free guidance). "
        "Training such a base at train.guidance != 1.0 warns: train a de-distilled base at 1.0 and apply the "
        "adapter to the distilled one.",
        False,
    )
    text_length: int = doc(
        "Text tokens per caption (0: the family's default). Families that read captions in windows of 77 tokens "
        "round it up to whole windows.", 0)
    system_prompt: str = doc(
        "Text a language-model text encoder reads before every caption ('auto': the family's own; '' none). "
        "Families whose text encoders are not language models ignore it.", "auto")
    prediction: Literal["auto", "epsilon", "v_prediction"] = doc(
        "What a noise-prediction (DDPM) model predicts: epsilon or v_prediction (v-pred checkpoints). 'auto': "
        "the family's default. Flow-matching families predict velocity and accept only 'auto'.", "auto")
    zero_terminal_snr: bool = doc(
        "Rescale a DDPM schedule to zero terminal SNR (use with v_prediction). Flow-matching families: off.", False)
    allow_pickle: bool = doc(
        "Also read .ckpt/.pt/.pth/.bin model files. Off: only .safetensors load, since a pickle can run code. "
        "On: they are read with torch.load(weights_only=True), which refuses anything but tensors.",
        False,
    )


@dataclass(frozen=True)
class DataConfig:
    images: str = doc(
        "Folder of training images, with a caption file beside each image (an image without one gets an empty "
        "caption plus the trigger). Shorthand for one source; use [[data.sources]] for more.", "")
    caption_extension: str = doc("Caption file extension.", ".txt")
    resolution: int = doc(
        "Training resolution in pixels: the square side, or with buckets the side of the target area.", 512)
    trigger: str = doc("Trigger word put in front of every caption ('' for none).", "")
    validation_images: int = doc(
        "Images held out from training for the validation loss (0: score the training images).", 1
    )
    cache_dir: str = doc("Latent and text-embedding cache folder. Empty: <run_dir>/../cache.", "")
    captions: CaptionSettings = doc("Caption processors of data.images.", default_factory=CaptionSettings)
    sources: tuple[SourceSettings, ...] = doc(
        "Further sources ([[data.sources]] tables), each with its own repeats, weight and caption settings.", ())
    buckets: BucketSettings = doc("Aspect-ratio buckets.", default_factory=BucketSettings)
    caption_variants: int = doc(
        "For captions that change every step (shuffle, dropout, choose): 0 encodes the text every step (text "
        "encoders stay loaded; exact); K > 0 pre-encodes K variants per caption and picks one each time the image "
        "is drawn (K text embeddings per image on disk, encoders unloaded after caching).", 0)
    strict: bool = doc("Stop at the first unusable file instead of skipping and counting it.", False)
    workers: int = doc("DataLoader worker processes that decode images while the latent cache is built.", 2)
    background: tuple[int, int, int] = doc("RGB colour transparent images are composited on.", (255, 255, 255))


@dataclass(frozen=True)
class BlockSettings:
    pattern: str = doc("A regex that must match a target's whole name, <component>.<module> (e.g. "
                       "'diffusion_model\\.transformer_blocks\\.[0-4]\\..*').", "")
    rank: int = doc("Rank of the matched targets (-1: adapter.rank; 0: leave them out).", -1)
    alpha: float = doc("Alpha of the matched targets (0: adapter.alpha).", 0.0)
    factor: int = doc("lokr: Kronecker factor of the matched targets (0: adapter.factor; -1: as square as "
                      "possible).", 0)


@dataclass(frozen=True)
class AdapterConfig:
    algorithm: str = doc(
        "What is trained: one of the registered adapter algorithms (the README's Adapters section lists them): "
        "lora (peft, linear layers), locon (LoRA on linear and convolution layers), loha (Hadamard product of "
        "two low-rank products), lokr (Kronecker product), dora (LoRA with the weight's magnitude per input "
        "column trained apart), full (the layers' own weights: a full fine-tune).", "lora")
    rank: int = doc("Rank of the adapter's low-rank factors.", 16)
    alpha: float = doc("Alpha; the update is scaled by alpha / rank (lokr: only where a factor is a low-rank "
                       "product, see full_matrix).", 16.0)
    dropout: float = doc(
        "Dropout probability in the adapter (0: none, the default of sd-scripts and ai-toolkit; SimpleTuner uses "
        "0.1): lora drops where dropout_on says, locon / loha / lokr drop its output; dora has none (leave it at "
        "0).", 0.0)
    dropout_on: Literal["rank", "input"] = doc(
        "Where LoRA's dropout acts. 'rank': on the rank-r activation A·x, between the two factors (sd-scripts' "
        "network_dropout and ai-toolkit's dropout; r values a token, so it costs next to nothing). 'input': on the "
        "layer's full-width input before A (peft's lora_dropout and SimpleTuner's; a mask as large as the "
        "activations, recomputed under gradient checkpointing). lora only.", "rank")
    targets: str = doc(
        "Which layers get an adapter: one of the family's presets (attention, attention_mlp, all_linear, ...).",
        "attention_mlp",
    )
    factor: int = doc(
        "lokr: how each side of a weight is split into the two Kronecker factors: the smaller part is this "
        "factor where it divides the side (Kohaku XL used 2 to 8), -1: as square as possible.", -1)
    full_matrix: bool = doc(
        "lokr: train both Kronecker factors as full matrices, as Kohaku XL did; rank and alpha are then unused and "
        "the update is not scaled. Off: the larger factor is a rank-`rank` product scaled by alpha / rank (a full "
        "matrix too where rank reaches half its size).", False)
    decompose_both: bool = doc(
        "lokr: also store the smaller Kronecker factor as a rank-`rank` product (where rank is under half its "
        "size). Not with full_matrix.", False)
    tucker: bool = doc(
        "locon / loha / lokr on convolutions with a kernel over 1x1: factor the kernel Tucker-style (a rank x rank "
        "core per kernel position) instead of folding it into the input side. Linear layers are unaffected.", False)
    blocks: tuple[BlockSettings, ...] = doc(
        "Per-block settings ([[adapter.blocks]] tables): the first whose pattern matches a target sets its rank, "
        "alpha and factor.", ())
    init_seed: int = doc("Seed of the adapter's initial weights.", 0)
    init_from: str = doc(
        "An adapter file to continue training from (.safetensors; ours, or a kohya / LyCORIS file of another "
        "trainer with the same layers): read when a new run starts, never on resume. Its algorithm, rank, alpha "
        "and factor must be this run's; its layer names may be the family's export names, or the model's own "
        "module names in the spellings other trainers use (lycoris_..., lora_unet_..., lora_transformer_..., "
        "transformer. / diffusion_model. / unet. ...). Empty: start from init_seed.", "")


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit", "lion8bit"] = doc(
        "adamw (torch) or 8-bit AdamW / Lion from bitsandbytes.", "adamw"
    )
    lr: float = doc("Peak learning rate.", 1e-4)
    betas: tuple[float, float] = doc("Adam/Lion betas.", (0.9, 0.999))
    weight_decay: float = doc("Decoupled weight decay.", 0.01)
    eps: float = doc("Adam epsilon.", 1e-8)
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = doc("Learning-rate schedule (diffusers.optimization.get_scheduler).", "constant_with_warmup")
    warmup_steps: int = doc("Warm-up steps of the schedule.", 0)
    text_encoder_lr: float = doc(
        "Learning rate of the text encoders' adapter, for families that can train them (Kohaku XL: 5e-6 with "
        "2e-5 for the UNet). 0: the text encoders stay frozen and their embeddings are cached.", 0.0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = doc("Total optimizer steps.", 1000)
    batch_size: int = doc("Images per micro-batch.", 1)
    gradient_accumulation: int = doc("Micro-batches per optimizer step.", 1)
    max_grad_norm: float = doc("Clip the gradient norm to this (0 disables).", 1.0)
    mixed_precision: Literal["fp32", "bf16"] = doc(
        "Compute dtype. bf16: base and activations in bf16, trainable weights in fp32.", "bf16"
    )
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", True)
    compile: bool = doc(
        "torch.compile each repeated block of the denoiser (regional compilation): faster steps after a first "
        "step that compiles (minutes). Compiled code is cached in <cache_dir>/torchinductor for later runs.",
        False)
    guidance: float = doc(
        "The guidance input during training, for families whose model has one: 1.0 for de-distilled bases "
        "(de-distilled).", 1.0
    )
    timesteps: Literal["auto", "uniform", "sigmoid", "shift", "auto_shift"] = doc(
        "Timestep sampling: 'auto' (the family's recipe); uniform; sigmoid (logit-normal); sigmoid then a fixed "
        "shift; sigmoid then the resolution-dependent shift of the flow-matching families' samplers.",
        "auto",
    )
    sigmoid_scale: float = doc("Scale s of t = sigmoid(s * N(0,1)).", 1.0)
    shift: float = doc("Fixed shift for timesteps='shift' (0: the family's default).", 0.0)
    min_snr_gamma: float = doc(
        "Min-SNR-gamma loss weighting of DDPM families (Kohaku XL: 5; 0: off).", 0.0)
    noise_offset: float = doc(
        "Noise offset of DDPM families: a per-channel constant of this scale added to the noise (Kohaku XL: "
        "0.0357; 0: off). Lets the model learn very dark and very bright images.", 0.0)
    debiased_estimation: bool = doc(
        "Debiased estimation loss of DDPM families: each sample weighted by 1/sqrt(SNR).", False)
    seed: int = doc("Seed of data order, noise and timesteps.", 42)
    checkpoint_every: int = doc("Write a resumable checkpoint every N steps (0: only at the end).", 250)
    keep_checkpoints: int = doc("How many of the newest checkpoints to keep.", 2)
    keep_checkpoint_every: int = doc(
        "Also keep every checkpoint whose step is a multiple of this, for good (0: none).", 0
    )
    nonfinite_patience: int = doc(
        "A step whose loss or gradient norm is NaN/inf is skipped (no update) and counted; after this many "
        "in a row the run stops with an error, its last checkpoint intact.",
        5,
    )
    validate_every: int = doc("Compute the held-out validation loss every N steps (0: never).", 100)
    log_every: int = doc("Write a metrics line every N steps.", 1)


@dataclass(frozen=True)
class EmaConfig:
    decay: float = doc(
        "Keep an exponential moving average of the trained weights (any adapter.algorithm) with this decay per "
        "update, e.g. 0.999 (0: no average). It is checkpointed, exported beside the weights as "
        "<output.name>-ema.safetensors and shown in previews.", 0.0)
    every: int = doc("Update the average every N optimizer steps.", 1)
    warmup: bool = doc(
        "Use min(decay, (1 + n) / (10 + n)) at the n-th update, so the first updates do not keep the average at "
        "the starting weights (diffusers' EMAModel default).", True)
    on_cpu: bool = doc(
        "Keep the average in host memory: saves one copy of the trained weights on the GPU, costs a transfer "
        "per update.", False)
    preview: bool = doc("Previews add a column sampled with the averaged weights.", True)


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = doc("Prompts for preview images.", ())
    seeds: tuple[int, ...] = doc("Seeds for preview images, one row each.", (0,))
    steps: int = doc("Sampling steps for previews.", 20)
    guidance: float = doc(
        "Guidance for previews: the model's guidance input where it has one (3.5 for a guidance-distilled model), "
        "else classifier-free guidance with the empty caption (1.0: none).", 3.5)
    resolution: int = doc("Preview resolution (0: the training resolution).", 0)


@dataclass(frozen=True)
class OutputConfig:
    run_dir: str = doc("Run folder: checkpoints, metrics.jsonl, exports. Relative to the config file.", "")
    name: str = doc("Name of the exported adapter file (without .safetensors).", "lora")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = doc("Base model files.", default_factory=ModelConfig)
    data: DataConfig = doc("Training data.", default_factory=DataConfig)
    adapter: AdapterConfig = doc("The adapter being trained.", default_factory=AdapterConfig)
    optimizer: OptimizerConfig = doc("Optimizer and schedule.", default_factory=OptimizerConfig)
    train: TrainConfig = doc("The training loop.", default_factory=TrainConfig)
    ema: EmaConfig = doc("Moving average of the trained weights.", default_factory=EmaConfig)
    sample: SampleConfig = doc("Preview images.", default_factory=SampleConfig)
    output: OutputConfig = doc("Where results go.", default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that name files: resolved relative to the config file and checked to exist.
MODEL_FILES = ("diffusion_model", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
PATH_FIELDS = {
    "model": MODEL_FILES,
    "data": ("images", "cache_dir"),
    "adapter": ("init_from",),
    "output": ("run_dir",),
}
SOURCE_PATH_FIELDS = ("path", "image_root")
# Keys older versions wrote, and what they are called now: old configs and checkpoints still load.
RENAMED = {("model", "transformer"): "diffusion_model", ("model", "t5_max_length"): "text_length",
           ("adapter", "kind"): "algorithm"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's type."""
    if dataclasses.is_dataclass(tp):  # a table inside an array of tables ([[data.sources]])
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where} = {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} = {value!r} has the wrong type")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp in (float, str) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be a {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix}] must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{where}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, where)
        else:
            kwargs[name] = _coerce(value, tp, where)
    return cls(**kwargs)


def _check_values(cfg: RunConfig) -> None:
    """Reject impossible values, naming the key."""
    checks = [
        ("adapter.rank", cfg.adapter.rank >= 1, "must be at least 1"),
        ("adapter.alpha", cfg.adapter.alpha > 0, "must be positive"),
        ("adapter.dropout", 0 <= cfg.adapter.dropout < 1, "must be in [0, 1)"),
        ("adapter.algorithm", cfg.adapter.algorithm in ALGORITHMS, f"must be one of {sorted(ALGORITHMS)}"),
        ("adapter.factor", cfg.adapter.factor == -1 or cfg.adapter.factor >= 1, "must be -1 or at least 1"),
        *(check for i, block in enumerate(cfg.adapter.blocks) for check in (
            (f"adapter.blocks[{i}].pattern", _is_regex(block.pattern), "must be a regular expression"),
            (f"adapter.blocks[{i}].rank", block.rank >= -1, "must be >= -1"),
            (f"adapter.blocks[{i}].alpha", block.alpha >= 0, "must be >= 0"),
            (f"adapter.blocks[{i}].factor", block.factor >= -1, "must be >= -1"))),
        ("optimizer.lr", cfg.optimizer.lr > 0, "must be positive"),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps >= 0, "must be >= 0"),
        ("train.steps", cfg.train.steps >= 1, "must be at least 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be at least 1"),
        ("train.gradient_accumulation", cfg.train.gradient_accumulation >= 1, "must be at least 1"),
        ("train.max_grad_norm", cfg.train.max_grad_norm >= 0, "must be >= 0"),
        ("train.sigmoid_scale", cfg.train.sigmoid_scale > 0, "must be positive"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, "must be >= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be at least 1"),
        ("train.keep_checkpoint_every", cfg.train.keep_checkpoint_every >= 0, "must be >= 0"),
        ("train.nonfinite_patience", cfg.train.nonfinite_patience >= 1, "must be at least 1"),
        ("train.log_every", cfg.train.log_every >= 1, "must be at least 1"),
        ("data.resolution", cfg.data.resolution >= 16, "must be at least 16"),
        ("data.validation_images", cfg.data.validation_images >= 0, "must be >= 0"),
        ("data.caption_variants", cfg.data.caption_variants >= 0, "must be >= 0"),
        ("data.workers", cfg.data.workers >= 0, "must be >= 0"),
        ("data.background", all(0 <= c <= 255 for c in cfg.data.background), "must be three values in 0..255"),
        *(check for i, source in enumerate(cfg.data.sources) for check in (
            (f"data.sources[{i}].path", bool(source.path), "must name a folder or a metadata file"),
            (f"data.sources[{i}].repeats", source.repeats >= 1, "must be at least 1"),
            (f"data.sources[{i}].weight", source.weight > 0, "must be positive"))),
        *(check for where, c in _caption_settings(cfg.data) for check in (
            (f"{where}.tag_dropout", 0 <= c.tag_dropout < 1, "must be in [0, 1)"),
            (f"{where}.caption_dropout", 0 <= c.caption_dropout < 1, "must be in [0, 1)"),
            (f"{where}.keep_first", c.keep_first >= 0, "must be >= 0"))),
        ("sample.steps", cfg.sample.steps >= 1, "must be at least 1"),
        ("sample.resolution", cfg.sample.resolution >= 0, "must be >= 0 (0: data.resolution)"),
        ("optimizer.text_encoder_lr", cfg.optimizer.text_encoder_lr >= 0, "must be >= 0"),
        ("train.min_snr_gamma", cfg.train.min_snr_gamma >= 0, "must be >= 0"),
        ("train.noise_offset", cfg.train.noise_offset >= 0, "must be >= 0"),
        ("train.shift", cfg.train.shift >= 0, "must be >= 0"),
        ("model.text_length", cfg.model.text_length >= 0, "must be >= 0"),
        ("model.base_precision", cfg.adapter.algorithm not in WHOLE_MODEL or cfg.model.base_precision not in (
            "fp8", "nf4"), f"= {cfg.model.base_precision!r} stores the base in float8 / 4 bits, which adapter."
         f"algorithm = {cfg.adapter.algorithm!r} cannot train (it trains the model's own weights): set "
         "model.base_precision = 'bf16' or 'auto' (with a bf16/fp16 model file)"),
        ("ema.decay", 0 <= cfg.ema.decay < 1, "must be in [0, 1) (0: no moving average)"),
        ("ema.every", cfg.ema.every >= 1, "must be at least 1"),
        ("model.vram_budget", cfg.model.vram_budget >= 0, "must be >= 0 (0: off)"),
        ("model.offload", cfg.model.offload == "none" or cfg.train.gradient_checkpointing or cfg.model.vram_budget > 0,
         "= 'blocks' needs train.gradient_checkpointing = true (without it backward keeps every block's copy)"),
        ("output.name", plain_file_name(cfg.output.name), "must be a plain file name (no '/', '\\' or '..')"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}")


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return bool(pattern)


def plain_file_name(name: str) -> bool:
    """True for a name that stays inside its folder: not empty, no '/', '\\', '..' or NUL."""
    return bool(name) and not any(bad in name for bad in ("/", "\\", "..", "\x00")) and name != "."


def _caption_settings(data: DataConfig) -> list[tuple[str, CaptionSettings]]:
    return [("data.captions", data.captions),
            *((f"data.sources[{i}].captions", s.captions) for i, s in enumerate(data.sources))]



def _resolve_paths(data: dict[str, Any], base: Path, fields: dict[str, tuple[str, ...]] = PATH_FIELDS) -> None:
    """Make relative paths relative to the config file's folder (in place)."""
    for section, keys in fields.items():
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                table[key] = str((base / value).resolve())
            elif isinstance(value, str) and value:
                table[key] = str(Path(value).expanduser())
    sources = data["data"].get("sources") if isinstance(data.get("data"), dict) else None
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict):
            _resolve_paths({"data": source}, base, {"data": SOURCE_PATH_FIELDS})


def check_files(cfg: RunConfig) -> None:
    """Check that every input the family reads exists; the message names the key and the path."""
    for i, source in enumerate(cfg.data.sources):
        if not Path(source.path).exists():
            raise ConfigError(f"data.sources[{i}].path: {source.path} does not exist")
    required = [("model", f.slot) for f in family(cfg.model.family).files]
    if cfg.data.images or not cfg.data.sources:  # the sources alone may be the dataset
        required.append(("data", "images"))
    for section, key in required:
        value = getattr(getattr(cfg, section), key)
        if not value:
            raise ConfigError(f"{section}.{key} is empty: set it to the path of the file or folder")
        if not Path(value).exists():
            raise ConfigError(f"{section}.{key}: {value} does not exist")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` with a TOML value (bare words are taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> RunConfig:
    """Read a TOML run config, apply ``--set`` overrides, validate, resolve relative paths."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        table = data
        for k in keys[:-1]:
            table = table.setdefault(k, {})
        table[keys[-1]] = value
    data = _renamed(data)
    data.setdefault("output", {}).setdefault("run_dir", f"runs/{path.stem}")
    _resolve_paths(data, path.parent.resolve())
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if check_paths:
        try:
            check_files(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated config from plain data, every "auto" value resolved by the model family."""
    cfg = _build(RunConfig, _renamed(data), "")
    _check_values(cfg)
    return family(cfg.model.family).resolve(cfg)


def current_key(key: str) -> str:
    """A dotted key (``model.transformer``) under its current name (``model.diffusion_model``)."""
    section, _, name = key.partition(".")
    return f"{section}.{RENAMED[section, name]}" if (section, name) in RENAMED else key


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of :data:`RENAMED` under their current names."""
    data = {section: dict(table) if isinstance(table, dict) else table for section, table in data.items()}
    for (section, old), new in RENAMED.items():
        table = data.get(section)
        if isinstance(table, dict) and old in table:
            if new in table:
                raise ConfigError(f"{section}.{old} is the old name of {section}.{new}: keep only {new}")
            table[new] = table.pop(old)
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_toml(cfg: RunConfig, comments: bool = True) -> str:
    """The config as TOML; with ``comments``, each key is preceded by its documentation."""
    lines: list[str] = []
    for section in dataclasses.fields(RunConfig):
        _toml_table(lines, f"[{section.name}]", section.name, getattr(cfg, section.name), section.metadata["doc"],
                    comments)
    return "\n".join(lines)


def _toml_table(lines: list[str], header: str, name: str, obj: Any, text: str, comments: bool) -> None:
    """One table: plain keys first, then nested tables ([a.b]) and arrays of tables ([[a.b]])."""
    lines.append(header + (f"  # {text}" if comments else ""))
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or (isinstance(value, tuple) and value
                                               and dataclasses.is_dataclass(value[0])):
            nested.append((f, value))
            continue
        if comments:
            lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    for f, value in nested:
        path = f"{name}.{f.name}"
        for item in value if isinstance(value, tuple) else (value,):
            header = f"[[{path}]]" if isinstance(value, tuple) else f"[{path}]"
            _toml_table(lines, header, path, item, f.metadata["doc"], comments)
