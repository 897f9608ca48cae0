"""Every registered family through the whole family contract, on its tiny model in the layouts users have.

A new family passes these before anything else: loading from its own files gives back the model it wrote,
encoders give batched embeddings and latents of the declared shapes, noising, prediction and sampling agree on
shapes and draws, a session trains and exports under the names the family declares, and no module outside the
family names it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraloom.loaders.dataset import Geometry
from loraloom.training.config import MODEL_FILES, RunConfig, TrainConfig, config_from_dict
from loraloom.training.families import FAMILIES
from loraloom.training.families.base import DENOISER
from loraloom.training.session import Session

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["zwx, a red circle on a yellow background", "a blue square"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def kit(request, tmp_path_factory):
    family = FAMILIES[request.param]
    tiny = family.tiny(seed=0, words=("zwx", "disc"))
    files = family.write_tiny(tiny, tmp_path_factory.mktemp(request.param))
    return family, tiny, files


def model_config(family, files, **model):
    slots = {slot: str(files[slot]) for slot in MODEL_FILES if slot in files}
    return config_from_dict({"model": {"family": family.name, **slots, **model}}).model  # the default text length


def test_declared_files_are_written_and_listed_from_comfyui_folders(kit):
    family, _, files = kit
    assert family.files and {f.slot for f in family.files} <= set(MODEL_FILES)
    for f in family.files:
        assert Path(files[f.slot]).exists(), f.slot
        assert f.folder in ("diffusion_models", "text_encoders", "vae", "checkpoints", "clip", "unet"), f.folder
    assert all(t.slot in ("tokenizer", "tokenizer_2") for t in family.tokenizers)
    assert Path(files["diffusion_model_fp8"]).exists() and Path(files["checkpoint"]).exists()


def test_the_denoiser_loads_back_from_its_file_and_the_all_in_one_checkpoint(kit):
    family, tiny, files = kit
    model = model_config(family, files)
    loaded = family.load_denoiser(model, torch.float32, keep_float8=False)
    expected = {k: v.to(torch.bfloat16).float() for k, v in tiny.denoiser.state_dict().items()}
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())  # the file is bf16
    assert not any(p.requires_grad for p in loaded.parameters())
    bundled = family.load_denoiser(model_config(family, files, diffusion_model=str(files["checkpoint"])),
                                   torch.float32, keep_float8=False)
    assert all(torch.equal(bundled.state_dict()[k], v) for k, v in loaded.state_dict().items())


def test_the_native_layout_loads_back_as_the_same_denoiser(kit, tmp_path):
    """What full fine-tunes and merges write (ComfyUI's diffusion_models layout) is what the family loads."""
    from loraloom.loaders.files import atomic_save_safetensors

    family, tiny, files = kit
    state = tiny.denoiser.state_dict()
    atomic_save_safetensors(family.native_state_dict(state), tmp_path / "native.safetensors")
    loaded = family.load_denoiser(model_config(family, files, diffusion_model=str(tmp_path / "native.safetensors")),
                                  torch.float32, keep_float8=False).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_text_encoders_give_batched_embeddings_of_one_shape(kit):
    family, tiny, files = kit
    text = family.load_text_encoder(model_config(family, files), torch.float32)
    ours, theirs = family.encode_text(text, CAPTIONS), family.encode_text(tiny.text, CAPTIONS)
    assert ours.keys() == theirs.keys() and ours
    for key, value in ours.items():
        assert value.dtype == torch.float32 and value.shape[0] == 2, key
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(v[0], v[1]) for v in ours.values())  # captions differ, embeddings too


def test_vae_round_trips_shapes_in_the_declared_channels(kit):
    family, _, files = kit
    vae = family.load_vae(model_config(family, files))
    f = family.vae_factor(vae)
    pixels = torch.rand(2, 3, 8 * f, 4 * f) * 2 - 1
    latents = family.encode_images(vae, pixels)
    assert latents.shape == (2, family.latent_channels, 8, 4) and latents.dtype == torch.float32
    decoded = family.decode_latents(vae, latents)
    assert decoded.shape == pixels.shape and decoded.min() >= -1 and decoded.max() <= 1
    assert family.bucket_divisor % f == 0


def test_noising_prediction_and_sampling_agree_on_shapes_and_draws(kit):
    family, tiny, _ = kit
    train = family.resolve_train(TrainConfig())
    latents = torch.randn(2, family.latent_channels, 8, 8)
    a = family.noised(latents, train, torch.Generator().manual_seed(3))
    b = family.noised(latents, train, torch.Generator().manual_seed(3))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.t, b.t)  # the generator is the only source
    assert a.inputs.shape == a.target.shape == a.noise.shape == latents.shape
    assert a.t.shape == a.weights.shape == (2,) and ((a.t >= 0) & (a.t <= 1)).all()
    fixed = family.noised(latents, train, torch.Generator(), t=torch.tensor([0.25, 0.75]), noise=a.noise)
    assert torch.equal(fixed.t, torch.tensor([0.25, 0.75])) and torch.equal(fixed.noise, a.noise)
    size = 8 * 8  # pixels of an 8-latent side at the tiny VAE's factor 8
    geometry = [Geometry((size, size), (0, 0), (size, size))] * 2
    text = family.encode_text(tiny.text, CAPTIONS)
    with torch.no_grad():
        pred = family.predict(tiny.denoiser, a.inputs, a.t, text, geometry, 1.0)
    assert pred.shape == a.target.shape and pred.dtype == torch.float32 and torch.isfinite(pred).all()
    one = {k: v[:1] for k, v in text.items()}
    sample = family.sample(tiny.denoiser, one, (size, size), (8, 8), seed=0, steps=2, guidance=1.0)
    assert sample.shape == (1, family.latent_channels, 8, 8) and torch.isfinite(sample).all()
    assert torch.equal(sample, family.sample(tiny.denoiser, one, (size, size), (8, 8), 0, 2, 1.0))


def test_presets_select_layers_and_export_keys_are_distinct(kit):
    family, tiny, _ = kit
    names = [n for n, m in tiny.denoiser.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    selected = {}
    for preset, pattern in family.targets.items():
        selected[preset] = {n for n in names if re.fullmatch(pattern, n)}
        assert selected[preset], preset
        keys = {family.export_key(DENOISER, n) for n in selected[preset]}
        assert len(keys) == len(selected[preset]), preset
    if {"attention", "attention_mlp", "all_linear"} <= selected.keys():
        assert selected["attention"] < selected["attention_mlp"] <= selected["all_linear"]
    assert {n for n in names if re.fullmatch(family.quantized, n)}


def test_a_session_trains_and_exports_under_the_family_names(kit, tmp_path, shapes_folder):
    family, _, files = kit
    cfg = config_from_dict({
        "model": {"family": family.name, **{s: str(files[s]) for s in MODEL_FILES if s in files}, "text_length": 16},
        "data": {"images": str(shapes_folder), "resolution": 64, "validation_images": 2,
                 "cache_dir": str(tmp_path / "cache")},
        "adapter": {"rank": 4, "alpha": 4.0},
        "train": {"steps": 2, "batch_size": 2, "mixed_precision": "fp32", "gradient_checkpointing": False,
                  "checkpoint_every": 0, "validate_every": 0},
        "output": {"run_dir": str(tmp_path / "run")}})
    session = Session.open(cfg)
    records = session.step(2)
    assert all(r["loss"] is not None for r in records)
    exported = load_file(session.export(dtype="fp32"))
    keys = {family.export_key(DENOISER, name.split(".", 1)[1]) for name in session.adapted_modules}
    assert {k.removesuffix(".alpha") if k.endswith(".alpha") else k.rsplit(".", 2)[0] for k in exported} == keys
    assert all(f"{key}.alpha" in exported for key in keys)
    assert family.comfy_conditioning(dict(session.val_items[0].text), 3.5)


def test_metadata_and_examples_are_plain_and_valid(kit):
    family, _, _ = kit
    cfg = config_from_dict(RunConfig().to_dict())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in family.metadata(cfg).items())
    example = family.example()
    assert set(example) <= {"model", "data", "train", "sample", "adapter", "optimizer"}
    assert config_from_dict({**example, "model": {**example.get("model", {}), "family": family.name}})


ENGINE_MODULES = ["loraloom/training/session.py", "loraloom/training/config.py", "loraloom/training/export.py",
                  "loraloom/training/cli.py", "loraloom/training/encoders.py", "loraloom/training/data.py",
                  "loraloom/training/demo.py", "loraloom/training/demo_data.py", "loraloom/training/checkpoint.py",
                  "loraloom/training/tools.py", "loraloom/training/ema.py", "loraloom/training/memory.py",
                  "loraloom/training/offload.py", "loraloom/training/compile.py",
                  *(str(p.relative_to(REPO)) for p in sorted((REPO / "loraloom" / "nodes").glob("*.py")))]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_module_outside_the_family_names_it(name):
    """Session, config, CLI, export, encoders, data, demo and nodes reach a family only through the contract."""
    words = {name, *FAMILIES[name].title.lower().split()} - {"model"}
    for path in ENGINE_MODULES:
        text = (REPO / path).read_text().lower()
        found = [w for w in words if re.search(rf"(?<![a-z0-9_]){re.escape(w)}(?![a-z0-9]|_layout)", text)]
        assert not found, f"{path} names {found}"
