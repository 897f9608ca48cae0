"""One typed run configuration, stored as TOML.

Every field carries its documentation in ``metadata["doc"]``; the example config and the error messages
are generated from it, so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..loaders.buckets import BucketSettings
from ..loaders.captions import CaptionSettings
from ..loaders.sources import SourceSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, phrased so the user can fix it from the message alone."""


def optional_module(name: str, setting: str, instead: str) -> Any:
    """Import an optional dependency that ``setting`` needs, or say how to install it or what to use instead."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"{setting} needs {name}, which is not importable here ({e}). Install it "
                          f"(pip install {name}) or use {instead}.") from None


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["flux"] = doc("Model family. Only 'flux' so far.", "flux")
    transformer: str = doc(
        "The diffusion transformer: a single .safetensors file (BFL/ComfyUI or diffusers keys, bf16/fp16/fp8), "
        "an all-in-one checkpoint (its model.diffusion_model. part is read) or a diffusers folder (the model "
        "root or its transformer/ subfolder).",
        "",
    )
    text_encoder: str = doc("CLIP-L text encoder: a .safetensors file, an all-in-one checkpoint or a folder.", "")
    text_encoder_2: str = doc("T5-XXL text encoder: a .safetensors file, an all-in-one checkpoint or a folder.", "")
    tokenizer: str = doc(
        "CLIP tokenizer folder. Empty: the text_encoder folder itself (or its sibling tokenizer/).", ""
    )
    tokenizer_2: str = doc(
        "T5 tokenizer folder. Empty: the text_encoder_2 folder itself (or its sibling tokenizer_2/).", ""
    )
    vae: str = doc("The VAE: ae.safetensors (BFL layout or diffusers keys), an all-in-one checkpoint or a "
                   "diffusers folder.", "")
    base_precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "nf4"] = doc(
        "Storage precision of the frozen base. 'auto' keeps fp8 files in fp8 and stores the rest in the "
        "compute dtype; 'fp8' stores every linear weight in float8_e4m3fn and computes in the compute dtype; "
        "'nf4' stores the transformer blocks' linear weights in 4-bit NormalFloat (QLoRA, bitsandbytes): about "
        "a quarter of bf16's memory, a little slower and less exact.",
        "auto",
    )
    guidance_distilled: bool = doc(
        "Mark the base as guidance-distilled (Flux-dev). Training such a base at guidance != 1.0 warns; "
        "train on a de-distilled base such as Flux-dev2pro instead and apply the LoRA to Flux-dev.",
        False,
    )
    t5_max_length: int = doc("T5 tokens per caption (Flux-dev uses 512, schnell 256).", 512)
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
class AdapterConfig:
    kind: Literal["lora"] = doc("Adapter type.", "lora")
    rank: int = doc("LoRA rank.", 16)
    alpha: float = doc("LoRA alpha; the update is scaled by alpha / rank.", 16.0)
    dropout: float = doc("LoRA dropout probability.", 0.0)
    targets: Literal["attention", "attention_mlp", "all_linear"] = doc(
        "Which layers get an adapter: attention projections, + MLPs, or every linear layer of the blocks "
        "including the modulation layers.",
        "attention_mlp",
    )
    init_seed: int = doc("Seed of the adapter's initial weights.", 0)


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
    guidance: float = doc(
        "The guidance input during training. 1.0 for de-distilled bases (Flux-dev2pro).", 1.0
    )
    timesteps: Literal["uniform", "sigmoid", "shift", "auto_shift"] = doc(
        "Timestep sampling: uniform; sigmoid (logit-normal); sigmoid then a fixed shift; sigmoid then the "
        "resolution-dependent shift Flux uses at inference.",
        "auto_shift",
    )
    sigmoid_scale: float = doc("Scale s of t = sigmoid(s * N(0,1)).", 1.0)
    shift: float = doc("Fixed shift for timesteps='shift'.", 3.0)
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
class SampleConfig:
    prompts: tuple[str, ...] = doc("Prompts for preview images.", ())
    seeds: tuple[int, ...] = doc("Seeds for preview images, one row each.", (0,))
    steps: int = doc("Sampling steps for previews.", 20)
    guidance: float = doc("Guidance input for previews (3.5 for Flux-dev).", 3.5)
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
    sample: SampleConfig = doc("Preview images.", default_factory=SampleConfig)
    output: OutputConfig = doc("Where results go.", default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that name files: resolved relative to the config file and checked to exist.
PATH_FIELDS = {
    "model": ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"),
    "data": ("images", "cache_dir"),
    "output": ("run_dir",),
}
SOURCE_PATH_FIELDS = ("path", "image_root")
REQUIRED_PATHS = {
    "model": ("transformer", "text_encoder", "text_encoder_2", "vae"),
    "data": ("images",),
}


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
        ("optimizer.lr", cfg.optimizer.lr > 0, "must be positive"),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps >= 0, "must be >= 0"),
        ("train.steps", cfg.train.steps >= 1, "must be at least 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be at least 1"),
        ("train.gradient_accumulation", cfg.train.gradient_accumulation >= 1, "must be at least 1"),
        ("train.max_grad_norm", cfg.train.max_grad_norm >= 0, "must be >= 0"),
        ("train.sigmoid_scale", cfg.train.sigmoid_scale > 0, "must be positive"),
        ("train.shift", cfg.train.shift > 0, "must be positive"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, "must be >= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be at least 1"),
        ("train.keep_checkpoint_every", cfg.train.keep_checkpoint_every >= 0, "must be >= 0"),
        ("train.nonfinite_patience", cfg.train.nonfinite_patience >= 1, "must be at least 1"),
        ("train.log_every", cfg.train.log_every >= 1, "must be at least 1"),
        ("data.resolution", cfg.data.resolution >= 16 and cfg.data.resolution % 16 == 0,
         "must be a multiple of 16 (VAE factor 8 x patch 2)"),
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
        ("sample.resolution", cfg.sample.resolution % 16 == 0, "must be a multiple of 16"),
        ("output.name", plain_file_name(cfg.output.name), "must be a plain file name (no '/', '\\' or '..')"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}")


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
    """Check that every required input exists; the message names the key and the path."""
    for i, source in enumerate(cfg.data.sources):
        if not Path(source.path).exists():
            raise ConfigError(f"data.sources[{i}].path: {source.path} does not exist")
    for section, keys in REQUIRED_PATHS.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if (section, key) == ("data", "images") and not value and cfg.data.sources:
                continue  # the sources are the dataset
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
    cfg = _build(RunConfig, data, "")
    _check_values(cfg)
    return cfg


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
