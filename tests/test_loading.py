"""Model files in every user layout load to the same weights; bad files get errors naming the file."""

from __future__ import annotations

import shutil

import pytest
import torch

from loraloom.loaders.files import ModelFileError
from loraloom.training.config import ModelConfig
from loraloom.training.families import flux, parts
from loraloom.training.families.flux_layout import transformer_to_bfl
from loraloom.training.tiny_models import to_fp8


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformer_layouts_give_identical_weights(tiny_parts, tiny_files):
    expected = {k: v.to(torch.bfloat16) for k, v in tiny_parts.denoiser.state_dict().items()}
    single = flux.load_transformer(tiny_files["diffusion_model"], torch.bfloat16, fp8_storage=False).state_dict()
    folder = flux.load_transformer(tiny_files["diffusers"], torch.bfloat16, fp8_storage=False).state_dict()
    subfolder = flux.load_transformer(tiny_files["diffusers"] / "transformer", torch.bfloat16, False).state_dict()
    assert _same(single, expected) and _same(folder, expected) and _same(subfolder, expected)


def test_fp8_file_keeps_fp8_storage(tiny_parts, tiny_files):
    model = flux.load_transformer(tiny_files["diffusion_model_fp8"], torch.bfloat16, fp8_storage=True)
    sd = model.state_dict()
    q = "transformer_blocks.0.attn.to_q.weight"
    assert sd[q].dtype == torch.float8_e4m3fn
    assert sd["transformer_blocks.0.attn.norm_q.weight"].dtype == torch.bfloat16  # vectors in compute dtype
    expected = to_fp8(transformer_to_bfl(tiny_parts.denoiser.state_dict()))["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(sd[q].view(torch.uint8), expected[: sd[q].shape[0]].view(torch.uint8))
    upcast = flux.load_transformer(tiny_files["diffusion_model_fp8"], torch.bfloat16, fp8_storage=False).state_dict()
    assert upcast[q].dtype == torch.bfloat16 and torch.equal(upcast[q], sd[q].to(torch.bfloat16))


def test_vae_layouts_give_identical_weights(tiny_parts, tiny_files):
    expected = tiny_parts.vae.state_dict()
    assert _same(parts.load_vae(tiny_files["vae"]).state_dict(), expected)
    assert _same(parts.load_vae(tiny_files["diffusers"]).state_dict(), expected)


def test_text_encoder_layouts_give_identical_embeddings(tiny_files):
    f = tiny_files
    single = ModelConfig(text_encoder=str(f["text_encoder"]), text_encoder_2=str(f["text_encoder_2"]),
                         tokenizer=str(f["tokenizer"]), tokenizer_2=str(f["tokenizer_2"]), text_length=16)
    folder = ModelConfig(text_encoder=str(f["diffusers"]), text_encoder_2=str(f["diffusers"]), text_length=16)
    prompts = ["zwx, a red circle on a yellow background", "a blue square"]
    a = flux.encode_prompts(flux.load_text_encoders(single, torch.float32), prompts)
    b = flux.encode_prompts(flux.load_text_encoders(folder, torch.float32), prompts)
    assert a["t5"].shape == (2, 16, 64) and a["pooled"].shape == (2, 64)
    assert torch.equal(a["t5"], b["t5"]) and torch.equal(a["pooled"], b["pooled"])
    assert not torch.equal(a["t5"][0], a["t5"][1])


def test_wrong_family_names_the_file(tiny_files):
    with pytest.raises(ModelFileError, match=r"ae\.safetensors is not a Flux transformer: expected keys like"):
        flux.load_transformer(tiny_files["vae"], torch.float32, False)
    with pytest.raises(ModelFileError, match=r"flux1-tiny\.safetensors is not a VAE"):
        parts.load_vae(tiny_files["diffusion_model"])
    cfg = ModelConfig(text_encoder=str(tiny_files["text_encoder_2"]), text_encoder_2=str(tiny_files["text_encoder_2"]),
                      tokenizer=str(tiny_files["tokenizer"]), tokenizer_2=str(tiny_files["tokenizer_2"]))
    with pytest.raises(ModelFileError, match=r"t5xxl\.safetensors is not a CLIPTextModel file"):
        flux.load_text_encoders(cfg, torch.float32)


def test_truncated_file_is_named(tiny_files, tmp_path):
    data = tiny_files["diffusion_model"].read_bytes()
    cut = tmp_path / "flux-cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"flux-cut\.safetensors: not a readable .safetensors file .*truncated"):
        flux.load_transformer(cut, torch.float32, False)


def test_pickle_checkpoints_are_refused(tiny_files, tmp_path):
    ckpt = tmp_path / "flux.ckpt"
    shutil.copy(tiny_files["diffusion_model"], ckpt)
    with pytest.raises(ModelFileError, match=r"flux\.ckpt: pickle checkpoints are not loaded"):
        flux.load_transformer(ckpt, torch.float32, False)


def test_single_file_encoder_without_tokenizer_says_what_to_set(tiny_files):
    cfg = ModelConfig(text_encoder=str(tiny_files["text_encoder"]), text_encoder_2=str(tiny_files["text_encoder_2"]))
    with pytest.raises(ModelFileError, match=r"set model.tokenizer to a tokenizer folder"):
        flux.load_text_encoders(cfg, torch.float32)


def test_config_read_from_shapes_matches_the_model(tiny_parts):
    config = flux.transformer_config_from_bfl(transformer_to_bfl(tiny_parts.denoiser.state_dict()))
    for key, value in config.items():
        assert tuple(getattr(tiny_parts.denoiser.config, key)) == tuple(value) if isinstance(value, tuple) \
            else getattr(tiny_parts.denoiser.config, key) == value, key


def test_all_in_one_checkpoint_gives_each_part(tiny_files):
    """ComfyUI's single-file Flux checkpoints bundle every part under a prefix; each loader reads only its own."""
    f, bundle = tiny_files, str(tiny_files["checkpoint"])
    assert _same(flux.load_transformer(bundle, torch.bfloat16, False).state_dict(),
                 flux.load_transformer(f["diffusion_model"], torch.bfloat16, False).state_dict())
    assert _same(parts.load_vae(bundle).state_dict(), parts.load_vae(f["vae"]).state_dict())
    tokenizers = {"tokenizer": str(f["tokenizer"]), "tokenizer_2": str(f["tokenizer_2"]), "text_length": 16}
    bundled = ModelConfig(text_encoder=bundle, text_encoder_2=bundle, **tokenizers)
    single = ModelConfig(text_encoder=str(f["text_encoder"]), text_encoder_2=str(f["text_encoder_2"]), **tokenizers)
    prompts = ["zwx, a red circle", "a blue square"]
    a = flux.encode_prompts(flux.load_text_encoders(bundled, torch.float32), prompts)
    b = flux.encode_prompts(flux.load_text_encoders(single, torch.float32), prompts)
    assert torch.equal(a["t5"], b["t5"]) and torch.equal(a["pooled"], b["pooled"])
