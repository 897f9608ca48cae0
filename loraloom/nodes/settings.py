"""Nodes that describe a run: the base model, the data, the adapter and the optimizer.

Each returns one of the engine's frozen config sections; the Train steps node puts them together.
"""

from __future__ import annotations

from pathlib import Path

from ..loaders.captions import CaptionSettings, split_tags
from ..loaders.sources import SourceSettings
from ..training.adapters import ALGORITHMS
from ..training.config import AdapterConfig, ConfigError, DataConfig, ModelConfig, OptimizerConfig, RunConfig
from ..training.data import describe_dataset
from ..training.families import FAMILIES
from ..training.families.base import Family
from . import host
from .widgets import CATEGORY, field_doc, widget


def model_node(family: Family) -> type:
    """The node that picks ``family``'s model files from ComfyUI's folders, its inputs from the family's contract:
    one list per file (its ComfyUI folder, then the checkpoints), the family's model options, and its
    tokenizer folders (empty: the ones that ship with ComfyUI)."""
    files, options, tokenizers = family.files, family.node_options, family.tokenizers

    class ModelForTraining:
        DESCRIPTION = (f"The {family.title} base to train on, from ComfyUI's models folders; all-in-one files from "
                       f"checkpoints/ are offered in every list and give each part. {family.node_note}").strip()
        CATEGORY = f"{CATEGORY}/setup"
        RETURN_TYPES = ("LORALOOM_MODEL",)
        RETURN_NAMES = ("model",)
        FUNCTION = "build"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                **{f.name: (host.model_choices(f.folder), {"tooltip": f.doc}) for f in files},
                **{name: widget(ModelConfig, name, **NUMBER_LIMITS.get(name, {})) for name in options},
            }, "optional": {
                **{t.name: ("STRING", {"default": "", "tooltip": f"{t.doc}; empty: the one that ships with ComfyUI "
                                       f"(comfy/{t.bundled})."}) for t in tokenizers},
                **{name: widget(ModelConfig, name, **NUMBER_LIMITS.get(name, {})) for name in MEMORY_OPTIONS}}}

        def build(self, **inputs) -> tuple[ModelConfig]:
            return (ModelConfig(
                family=family.name,
                **{f.slot: str(host.model_path(f.folder, inputs[f.name])) for f in files},
                **{t.slot: inputs.get(t.name) or str(host.bundled_tokenizer(t.bundled)) for t in tokenizers},
                **{name: inputs[name] for name in options},
                **{name: inputs[name] for name in MEMORY_OPTIONS if name in inputs}),)

    ModelForTraining.__name__ = ModelForTraining.__qualname__ = f"ModelForTraining{family.title.replace(' ', '')}"
    return ModelForTraining


# Every family's model node offers these (optional, so saved graphs stay valid).
MEMORY_OPTIONS = ("vram_budget", "offload", "offload_activations")
NUMBER_LIMITS = {"text_length": {"min": 0, "max": 4096}, "vram_budget": {"min": 0.0, "max": 1024.0, "step": 0.5}}


class _DatasetNode:
    """A dataset node: the dataset, and a few captions as the model will read them."""
    CATEGORY = f"{CATEGORY}/data"
    RETURN_TYPES = ("LORALOOM_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "caption_preview")
    FUNCTION = "build"
    PREVIEW_CAPTIONS = 5


class DatasetFolder(_DatasetNode):
    """A folder of images with a caption file beside each."""

    DESCRIPTION = "Images with caption files beside them. A relative folder is looked up in ComfyUI's input folder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": widget(DataConfig, "images"),
            "caption_extension": widget(DataConfig, "caption_extension"),
            "trigger": widget(DataConfig, "trigger"),
            "resolution": widget(DataConfig, "resolution", min=16, max=4096, step=16),
            "validation_images": widget(DataConfig, "validation_images", min=0, max=10000),
        }, "optional": {"captions": _CAPTIONS_INPUT}}

    def build(self, folder: str, caption_extension: str, trigger: str, resolution: int, validation_images: int,
              captions: CaptionSettings | None = None) -> tuple[DataConfig, str]:
        path = _input_path(folder)
        if not path.is_dir():
            raise ConfigError(f"dataset folder {path} does not exist: give an absolute path, or a folder inside "
                              "ComfyUI's input folder")
        data = DataConfig(images=str(path), caption_extension=caption_extension, resolution=resolution,
                          trigger=trigger, validation_images=validation_images,
                          captions=captions or CaptionSettings())
        return data, _preview(data, self.PREVIEW_CAPTIONS)


class DatasetMetadata(_DatasetNode):
    """A JSONL / CSV / Parquet file with one record per image (path and caption columns, or booru fields)."""

    DESCRIPTION = ("Images listed in a metadata file (.jsonl, .csv, .parquet) with a path column and caption "
                   "columns or booru fields. A relative file is looked up in ComfyUI's input folder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "metadata_file": ("STRING", {"default": "", "tooltip": (
                "A .jsonl, .csv or .parquet file with one record per image; relative: inside ComfyUI's input "
                "folder.")}),
            "path_column": widget(SourceSettings, "path_column"),
            "caption_columns": ("STRING", {"default": ", ".join(SourceSettings().caption_columns), "tooltip": (
                f"{field_doc(SourceSettings, 'caption_columns')} Comma-separated.")}),
            "booru": widget(SourceSettings, "booru"),
            "image_root": widget(SourceSettings, "image_root"),
            "repeats": widget(SourceSettings, "repeats", min=1, max=10000),
            "trigger": widget(DataConfig, "trigger"),
            "resolution": widget(DataConfig, "resolution", min=16, max=4096, step=16),
            "validation_images": widget(DataConfig, "validation_images", min=0, max=10000),
        }, "optional": {"captions": _CAPTIONS_INPUT}}

    def build(self, metadata_file: str, path_column: str, caption_columns: str, booru: bool, image_root: str,
              repeats: int, trigger: str, resolution: int, validation_images: int,
              captions: CaptionSettings | None = None) -> tuple[DataConfig, str]:
        path = _input_path(metadata_file)
        if not path.is_file():
            raise ConfigError(f"metadata file {path} does not exist: give an absolute path, or a file inside "
                              "ComfyUI's input folder")
        root = str(_input_path(image_root)) if image_root else ""
        source = SourceSettings(path=str(path), repeats=repeats, booru=booru, image_root=root,
                                path_column=path_column,
                                caption_columns=split_tags(caption_columns),
                                captions=captions or CaptionSettings())
        data = DataConfig(images="", sources=(source,), trigger=trigger, resolution=resolution,
                          validation_images=validation_images)
        return data, _preview(data, self.PREVIEW_CAPTIONS)


_CAPTIONS_INPUT = ("LORALOOM_CAPTIONS", {"tooltip": "Caption processors (the LoRA Loom caption nodes); the "
                                         "preview shows the captions after them."})


def _input_path(name: str) -> Path:
    """An absolute path as given; a relative one inside ComfyUI's input folder."""
    path = Path(name.strip()).expanduser()
    return path if path.is_absolute() else host.input_dir() / path


def _preview(data: DataConfig, samples: int) -> str:
    # The engine's own preview (what `loraloom dataset inspect` prints): no index cache, no image decoded.
    return "\n".join(describe_dataset(RunConfig(data=data), None, samples))


class AdapterSettings:
    DESCRIPTION = ("What is trained: the adapter algorithm and its settings (each input's tooltip says which "
                   "algorithms read it), which layers get one, and optionally an adapter file from the loras folder "
                   "to continue training from.")
    CATEGORY = f"{CATEGORY}/setup"
    RETURN_TYPES = ("LORALOOM_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "build"
    NO_FILE = "(none)"  # the init_from choice that starts from the seed

    @classmethod
    def INPUT_TYPES(cls):
        presets = sorted({name for f in FAMILIES.values() for name in f.targets})
        return {"required": {
            "rank": widget(AdapterConfig, "rank", min=1, max=1024),
            "alpha": widget(AdapterConfig, "alpha", min=0.01, max=4096.0),
            "dropout": widget(AdapterConfig, "dropout", min=0.0, max=0.99),
            "targets": (presets, {"default": AdapterConfig().targets, "tooltip": field_doc(AdapterConfig, "targets")}),
            "init_seed": widget(AdapterConfig, "init_seed", min=0, max=2**31 - 1),
        }, "optional": {
            "algorithm": (list(ALGORITHMS), {"default": AdapterConfig().algorithm,
                                             "tooltip": field_doc(AdapterConfig, "algorithm")}),
            "factor": widget(AdapterConfig, "factor", min=-1, max=1024),
            "full_matrix": widget(AdapterConfig, "full_matrix"),
            "decompose_both": widget(AdapterConfig, "decompose_both"),
            "tucker": widget(AdapterConfig, "tucker"),
            "dropout_on": widget(AdapterConfig, "dropout_on"),
            "init_from": ([cls.NO_FILE, *host.folder_files("loras")], {
                "default": cls.NO_FILE, "tooltip": field_doc(AdapterConfig, "init_from")}),
        }}

    def build(self, rank: int, alpha: float, dropout: float, targets: str, init_seed: int,
              algorithm: str = AdapterConfig.algorithm, factor: int = AdapterConfig.factor,
              full_matrix: bool = AdapterConfig.full_matrix, decompose_both: bool = AdapterConfig.decompose_both,
              tucker: bool = AdapterConfig.tucker, dropout_on: str = AdapterConfig.dropout_on,
              init_from: str = NO_FILE) -> tuple[AdapterConfig]:
        path = "" if init_from == self.NO_FILE else str(host.model_path("loras", init_from))
        return (AdapterConfig(algorithm=algorithm, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                              factor=factor, full_matrix=full_matrix, decompose_both=decompose_both, tucker=tucker,
                              dropout_on=dropout_on, init_seed=init_seed, init_from=path),)


class OptimizerSettings:
    DESCRIPTION = "Optimizer and learning-rate schedule."
    CATEGORY = f"{CATEGORY}/setup"
    RETURN_TYPES = ("LORALOOM_OPTIMIZER",)
    RETURN_NAMES = ("optimizer",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "optimizer": widget(OptimizerConfig, "name"),
            "lr": widget(OptimizerConfig, "lr", min=1e-8, max=1.0, step=1e-6, round=False),
            "scheduler": widget(OptimizerConfig, "scheduler"),
            "warmup_steps": widget(OptimizerConfig, "warmup_steps", min=0, max=1_000_000),
            "weight_decay": widget(OptimizerConfig, "weight_decay", min=0.0, max=1.0, step=0.001),
        }, "optional": {
            "text_encoder_lr": widget(OptimizerConfig, "text_encoder_lr", min=0.0, max=1.0, step=1e-7, round=False),
        }}

    def build(self, optimizer: str, lr: float, scheduler: str, warmup_steps: int, weight_decay: float,
              text_encoder_lr: float = 0.0) -> tuple[OptimizerConfig]:
        return (OptimizerConfig(name=optimizer, lr=lr, scheduler=scheduler, warmup_steps=warmup_steps,
                                weight_decay=weight_decay, text_encoder_lr=text_encoder_lr),)
