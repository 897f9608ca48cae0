"""ComfyUI nodes of LoRA Loom. Importing this imports no ComfyUI module; the nodes reach the host through
:mod:`.host` when they run."""

from __future__ import annotations

import importlib.util

from ..training.families import FAMILIES
from .adapter import ApplyTrainedAdapter, ExportAdapter
from .captions import CaptionAffixes, CaptionFormat, CaptionShuffle, CaptionTags
from .encode import EncodeDataset, EncodePrompt
from .images import LossGraph, SideBySide
from .settings import AdapterSettings, DatasetFolder, DatasetMetadata, OptimizerSettings, model_node
from .train import TrainSteps

# id -> (class, display name). Ids carry the LoraLoom prefix: ComfyUI silently drops a node whose id clashes.
NODES = {
    **{f"LoraLoomModel{f.title.replace(' ', '')}": (model_node(f), f"Model for training ({f.title})")
       for f in FAMILIES.values()},
    "LoraLoomDatasetFolder": (DatasetFolder, "Dataset (folder)"),
    "LoraLoomDatasetMetadata": (DatasetMetadata, "Dataset (metadata file)"),
    "LoraLoomEncodeDataset": (EncodeDataset, "Encode dataset (cache)"),
    "LoraLoomCaptionTags": (CaptionTags, "Caption tags (normalise)"),
    "LoraLoomCaptionShuffle": (CaptionShuffle, "Caption shuffle / dropout"),
    "LoraLoomCaptionAffixes": (CaptionAffixes, "Caption prefix / suffix"),
    "LoraLoomCaptionFormat": (CaptionFormat, "Caption format"),
    "LoraLoomAdapter": (AdapterSettings, "Adapter settings"),
    "LoraLoomOptimizer": (OptimizerSettings, "Optimizer settings"),
    "LoraLoomTrainSteps": (TrainSteps, "Train steps"),
    "LoraLoomExportAdapter": (ExportAdapter, "Export adapter to loras"),
    "LoraLoomApplyAdapter": (ApplyTrainedAdapter, "Apply trained adapter"),
    "LoraLoomEncodePrompt": (EncodePrompt, "Encode prompt (engine encoders)"),
    "LoraLoomLossGraph": (LossGraph, "Loss graph"),
    "LoraLoomSideBySide": (SideBySide, "Side by side"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: f"LoRA Loom: {name}" for node_id, (_, name) in NODES.items()}

# Optional packages (pyproject's extras) and what needs them: a missing one is named when ComfyUI loads the pack,
# not first at the queue item that needs it.
OPTIONAL_FEATURES = {"bitsandbytes": "the 8-bit optimizers (adamw8bit, lion8bit) and the nf4 base precision"}


def unavailable_features() -> list[str]:
    return [f"{features} are unavailable: {module} is not installed in this Python (pip install {module})"
            for module, features in OPTIONAL_FEATURES.items() if importlib.util.find_spec(module) is None]
