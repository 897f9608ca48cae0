"""A test-only ComfyUI node: DualCLIPLoader (type flux) for the tiny text encoders of the host tests.

Stock DualCLIPLoader reads T5-XXL's and CLIP-L's widths from fixed config files (T5-XXL alone is 4.7B
parameters). This node calls the same loader function, ``comfy.sd.load_clip`` with ``CLIPType.FLUX``, and gives
the tiny widths through ComfyUI's own ``<model>_model_config`` override; tokenizers, model classes and the CLIP
object are ComfyUI's. Weights in float32 (as ``--fp32-text-enc``), so the test can compare with the engine.
"""

import comfy.sd
import folder_paths
import torch

CLIP_L = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1}
T5 = {"d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128, "num_layers": 1}


class TinyFluxCLIPLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,)}}

    def load(self, clip_name1, clip_name2):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", name) for name in (clip_name1, clip_name2)]
        # CLIP-L's goes in as "model_config": the loader rebuilds "clip_l_model_config" from it (long_clipl.py).
        options = {"dtype": torch.float32, "model_config": dict(CLIP_L), "t5xxl_model_config": dict(T5)}
        return (comfy.sd.load_clip(paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type=comfy.sd.CLIPType.FLUX, model_options=options),)


NODE_CLASS_MAPPINGS = {"TinyFluxCLIPLoader": TinyFluxCLIPLoader}
